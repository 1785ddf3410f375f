/* First-write benchmark helper for tools/bench_tracker: the target's own cost of writing.
 *
 *   bench_firstwrite NPAGES
 *
 * Maps region A (NPAGES pages, populated) and region F (NPAGES pages, never touched), prints
 * "ready PID", then serves commands on stdin (one reply line each, times in nanoseconds):
 *   write   write one byte into each page of A, timed          -> "ok NS"
 *   fault   write one byte into each page of F (anonymous page faults), timed, then
 *           MADV_DONTNEED F so the next pass faults again      -> "ok NS"
 *   quit    exit
 * The tracker attaches between commands: "write" then measures a first write to a protected page. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t touch(volatile unsigned char *p, size_t n, unsigned char v)
{
	uint64_t t0 = now_ns();
	for (size_t i = 0; i < n; i++)
		p[i * PG] = v;
	return now_ns() - t0;
}

int main(int argc, char **argv)
{
	size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 65536;
	if (n == 0) {
		fprintf(stderr, "usage: %s NPAGES\n", argv[0]);
		return 2;
	}
	unsigned char *a = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	unsigned char *f = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED || f == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	madvise(a, n * PG, MADV_NOHUGEPAGE); /* 4 KiB pages in both: a fair comparison */
	madvise(f, n * PG, MADV_NOHUGEPAGE);
	memset(a, 1, n * PG);
	printf("ready %d\n", getpid());
	fflush(stdout);

	unsigned char v = 2;
	char line[64];
	while (fgets(line, sizeof(line), stdin)) {
		if (!strncmp(line, "write", 5)) {
			printf("ok %llu\n", (unsigned long long)touch(a, n, v++));
		} else if (!strncmp(line, "fault", 5)) {
			uint64_t ns = touch(f, n, v++);
			madvise(f, n * PG, MADV_DONTNEED);
			printf("ok %llu\n", (unsigned long long)ns);
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		} else {
			printf("err unknown command\n");
		}
		fflush(stdout);
	}
	return 0;
}
