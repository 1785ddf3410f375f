/* wpdump demo workload: a process whose memory keeps changing.
 *
 *   demo [MIB [PERCENT]]     defaults: 64 MiB, 1 %
 *
 * Allocates MIB MiB of anonymous memory and fills it, prints "ready PID" on stdout, then loops
 * forever: every 100 ms it writes random bytes into PERCENT % of its pages (random pages, random
 * offsets); about every 2 s it munmaps the small region it mapped last time, mmaps a new one and
 * fills it, and grows its heap with sbrk (docs/kernel.md rule 3: new, unregistered VMAs). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define SMALL_PAGES 16
#define BRK_STEP (64 * 1024)
#define BRK_MAX (64L * 1024 * 1024)

static uint64_t rng_state = 88172645463325252ULL;

static uint64_t rnd(void)
{
	/* xorshift64 */
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void fill_random(unsigned char *p, size_t len)
{
	size_t i = 0;
	for (; i + 8 <= len; i += 8) {
		uint64_t v = rnd();
		memcpy(p + i, &v, 8);
	}
	for (; i < len; i++)
		p[i] = (unsigned char)rnd();
}

int main(int argc, char **argv)
{
	long mib = argc > 1 ? atol(argv[1]) : 64;
	double pct = argc > 2 ? atof(argv[2]) : 1.0;
	if (mib <= 0 || pct < 0 || pct > 100) {
		fprintf(stderr, "usage: %s [MIB>0 [PERCENT 0-100]]\n", argv[0]);
		return 2;
	}
	rng_state ^= (uint64_t)getpid() * 0x9E3779B97F4A7C15ULL;
	size_t size = (size_t)mib << 20, npages = size / PG;
	unsigned char *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	fill_random(buf, size);

	printf("ready %d\n", getpid());
	fflush(stdout);

	size_t per_tick = (size_t)(npages * pct / 100.0 + 0.5);
	unsigned char *small = NULL;
	long grown = 0;
	struct timespec tick = {0, 100 * 1000 * 1000};
	for (unsigned long n = 1;; n++) {
		for (size_t i = 0; i < per_tick; i++) {
			unsigned char *pg = buf + (rnd() % npages) * PG;
			size_t off = rnd() % (PG - 64);
			fill_random(pg + off, 1 + rnd() % 64);
		}
		if (n % 20 == 0) { /* every ~2 s: churn a small mapping, grow the heap */
			if (small)
				munmap(small, SMALL_PAGES * PG);
			small = mmap(NULL, SMALL_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				     -1, 0);
			if (small == MAP_FAILED)
				small = NULL;
			else
				fill_random(small, SMALL_PAGES * PG);
			if (grown < BRK_MAX) {
				void *top = sbrk(BRK_STEP);
				if (top != (void *)-1) {
					fill_random(top, BRK_STEP);
					grown += BRK_STEP;
				}
			}
		}
		nanosleep(&tick, NULL);
	}
}
