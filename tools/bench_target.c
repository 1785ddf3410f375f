/* Harvest-benchmark target for tools/bench_tracker.
 *
 *   bench_target MIB
 *
 * Maps and fills MIB MiB of anonymous memory, starts a thread that keeps running (it reads random
 * pages, writes nothing: the mm stays live on a CPU, as in a busy process), prints "ready PID",
 * then serves commands on stdin, one reply line each:
 *   dirty PCT   write one byte into PCT % of the pages, distinct and random -> "ok K" (pages written)
 *   quit        exit */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096UL

static unsigned char *buf;
static size_t npages;
static volatile uint64_t sink;

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *spin(void *arg)
{
	uint64_t s = 0x2545F4914F6CDD1DULL, acc = 0;
	(void)arg;
	for (;;) {
		for (int i = 0; i < 4096; i++)
			acc += buf[(xorshift(&s) % npages) * PG + (i & 63)];
		sink = acc;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long mib = argc > 1 ? atol(argv[1]) : 1024;
	if (mib <= 0) {
		fprintf(stderr, "usage: %s MIB\n", argv[0]);
		return 2;
	}
	npages = ((size_t)mib << 20) / PG;
	buf = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t *idx = malloc(npages * sizeof(*idx));
	if (buf == MAP_FAILED || !idx) {
		perror("alloc");
		return 1;
	}
	memset(buf, 0x5a, npages * PG);
	for (size_t i = 0; i < npages; i++)
		idx[i] = (uint32_t)i;
	pthread_t t;
	if (pthread_create(&t, NULL, spin, NULL)) {
		perror("pthread_create");
		return 1;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);

	uint64_t s = 88172645463325252ULL ^ (uint64_t)getpid();
	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		double pct;
		if (sscanf(line, "dirty %lf", &pct) == 1) {
			size_t k = (size_t)(npages * pct / 100.0 + 0.5);
			if (k > npages)
				k = npages;
			for (size_t i = 0; i < k; i++) { /* partial Fisher-Yates: k distinct pages */
				size_t j = i + xorshift(&s) % (npages - i);
				uint32_t tmp = idx[i];
				idx[i] = idx[j];
				idx[j] = tmp;
				buf[(size_t)idx[i] * PG + (xorshift(&s) % PG)]++;
			}
			printf("ok %zu\n", k);
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		} else {
			printf("err unknown command\n");
		}
		fflush(stdout);
	}
	return 0;
}
