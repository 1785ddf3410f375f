/* Workload for tools/bench: a process whose memory is written in controlled amounts.
 *
 *   bench_workload MIB [WRITERS]
 *
 * Maps MIB MiB of private anonymous memory (4 KiB pages: THP is left as the system's default, i.e.
 * off in `madvise` mode), fills every page (the first 8 bytes hold the page index, the rest 0x5a),
 * starts WRITERS writer threads (default 1), prints "ready PID", then serves commands on stdin,
 * one reply line each:
 *
 *   dirty PCT [PATTERN]   write one byte into PCT % of the pages (distinct pages) and wait until
 *                         done -> "ok K" (pages written). The writer threads share the pages.
 *   rate PPS [PATTERN]    from now on dirty PPS pages per second continuously, in the background
 *                         (writer threads, in slices of 1 ms); "rate 0" stops -> "ok 0"
 *   stripe V              make every odd page of the first V pages PROT_EXEC too: about V VMAs
 *                         (tools/bench --vmas), every page still writable -> "ok V"
 *   spin 1|0              start/stop a thread that keeps reading random pages (the mm stays live on
 *                         a CPU, as in a busy process; it writes nothing) -> "ok 0"
 *   quit                  exit
 *
 * Patterns: uniform (distinct pages, uniformly random over all of the memory: the default),
 * hot (distinct random pages inside a hot set: the first 1/8 of the memory, or more when PCT asks
 * for more), seq (a sequential sweep: the next K pages after where the previous sweep stopped).
 * Between commands the process blocks in read(0): idle. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define MAX_WRITERS 64

static unsigned char *buf;
static size_t npages;
static int nwriters;
static volatile uint64_t sink;

/* The pages of one command: page(i) for i in [0, k), distinct, computed without touching memory
 * (a table of page numbers would itself be written, adding dirty pages of the workload's own). */
static struct job {
	int pattern;
	size_t k, span, base;
	uint64_t key;
} job;
static size_t seq_pos;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_go = PTHREAD_COND_INITIALIZER, cv_done = PTHREAD_COND_INITIALIZER;
static uint64_t generation;
static int finished;

static atomic_int spin_on;
static atomic_long rate_pps;
static int rate_pattern;

enum { UNIFORM, HOT, SEQ };

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 31;
	x *= 0x7fb5d329728ea185ULL;
	x ^= x >> 27;
	x *= 0x81dadef4bc2dd44dULL;
	return x ^ (x >> 33);
}

/* A pseudo-random permutation of [0, n): a 4-round Feistel network on the smallest even number of
 * bits covering n, cycle-walking until the value falls inside [0, n). */
static uint64_t permute(uint64_t x, uint64_t n, uint64_t key)
{
	int half = 1;
	while ((1ULL << (2 * half)) < n)
		half++;
	uint64_t mask = (1ULL << half) - 1;
	do {
		uint64_t l = x >> half, r = x & mask;
		for (int round = 0; round < 4; round++) {
			uint64_t t = l ^ (mix(r ^ key ^ ((uint64_t)round << 58)) & mask);
			l = r;
			r = t;
		}
		x = (l << half) | r;
	} while (x >= n);
	return x;
}

static size_t page_of(size_t i)
{
	if (job.pattern == SEQ)
		return (job.base + i) % npages;
	return (size_t)permute(i, job.span, job.key);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int parse_pattern(const char *s)
{
	if (!s || !*s || !strncmp(s, "uniform", 7))
		return UNIFORM;
	if (!strncmp(s, "hot", 3))
		return HOT;
	if (!strncmp(s, "seq", 3))
		return SEQ;
	return -1;
}

/* Set up the job for k distinct pages following the pattern; returns k (at most all pages). */
static size_t choose(size_t k, int pattern, uint64_t *s)
{
	if (k > npages)
		k = npages;
	job.pattern = pattern;
	job.k = k;
	job.key = xorshift(s);
	job.span = pattern == HOT ? (npages / 8 > k ? npages / 8 : k) : npages;
	if (pattern == SEQ) {
		job.base = seq_pos;
		seq_pos = (seq_pos + k) % npages;
	}
	return k;
}

static void *writer(void *arg)
{
	int me = (int)(intptr_t)arg;
	uint64_t seen = 0;
	for (;;) {
		pthread_mutex_lock(&mu);
		while (generation == seen)
			pthread_cond_wait(&cv_go, &mu);
		seen = generation;
		pthread_mutex_unlock(&mu);
		size_t per = (job.k + nwriters - 1) / nwriters;
		size_t lo = (size_t)me * per, hi = lo + per < job.k ? lo + per : job.k;
		for (size_t i = lo; i < hi; i++)
			buf[page_of(i) * PG + 8 + mix(i ^ job.key) % (PG - 8)]++;
		pthread_mutex_lock(&mu);
		if (++finished == nwriters)
			pthread_cond_signal(&cv_done);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

/* Run the job on the writer threads and wait for them. */
static void run_writers(void)
{
	pthread_mutex_lock(&mu);
	finished = 0;
	generation++;
	pthread_cond_broadcast(&cv_go);
	while (finished < nwriters)
		pthread_cond_wait(&cv_done, &mu);
	pthread_mutex_unlock(&mu);
}

static void *spinner(void *arg)
{
	uint64_t s = 0x2545F4914F6CDD1DULL, acc = 0;
	(void)arg;
	for (;;) {
		if (!atomic_load(&spin_on)) {
			usleep(1000);
			continue;
		}
		for (int i = 0; i < 4096; i++)
			acc += buf[(xorshift(&s) % npages) * PG + (i & 63)];
		sink = acc;
	}
	return NULL;
}

static pthread_mutex_t cmd_mu = PTHREAD_MUTEX_INITIALIZER; /* dirty vs rate: one at a time */

static void *rater(void *arg)
{
	uint64_t s = 0xD1B54A32D192ED03ULL;
	double carry = 0;
	(void)arg;
	for (;;) {
		long pps = atomic_load(&rate_pps);
		if (pps <= 0) {
			usleep(1000);
			carry = 0;
			continue;
		}
		uint64_t t0 = now_ns();
		carry += pps / 1000.0;
		size_t k = (size_t)carry;
		carry -= k;
		if (k) {
			pthread_mutex_lock(&cmd_mu);
			choose(k, rate_pattern, &s);
			run_writers();
			pthread_mutex_unlock(&cmd_mu);
		}
		uint64_t spent = now_ns() - t0;
		if (spent < 1000000)
			usleep((1000000 - spent) / 1000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long mib = argc > 1 ? atol(argv[1]) : 1024;
	nwriters = argc > 2 ? atoi(argv[2]) : 1;
	if (mib <= 0 || nwriters < 1 || nwriters > MAX_WRITERS) {
		fprintf(stderr, "usage: %s MIB [WRITERS (1..%d)]\n", argv[0], MAX_WRITERS);
		return 2;
	}
	npages = ((size_t)mib << 20) / PG;
	buf = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(buf, 0x5a, npages * PG);
	for (size_t i = 0; i < npages; i++)
		memcpy(buf + i * PG, &(uint64_t){i}, 8);
	pthread_t t;
	for (int i = 0; i < nwriters; i++)
		if (pthread_create(&t, NULL, writer, (void *)(intptr_t)i)) {
			perror("pthread_create");
			return 1;
		}
	if (pthread_create(&t, NULL, spinner, NULL) || pthread_create(&t, NULL, rater, NULL)) {
		perror("pthread_create");
		return 1;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);

	uint64_t s = 88172645463325252ULL ^ (uint64_t)getpid();
	char line[256], pat[32];
	while (fgets(line, sizeof(line), stdin)) {
		double pct;
		long v;
		pat[0] = 0;
		if (sscanf(line, "dirty %lf %31s", &pct, pat) >= 1) {
			int p = parse_pattern(pat);
			if (p < 0 || pct < 0) {
				printf("err bad pattern or percentage\n");
			} else {
				pthread_mutex_lock(&cmd_mu);
				size_t k = choose((size_t)(npages * pct / 100.0 + 0.5), p, &s);
				run_writers();
				pthread_mutex_unlock(&cmd_mu);
				printf("ok %zu\n", k);
			}
		} else if (sscanf(line, "rate %ld %31s", &v, pat) >= 1) {
			int p = parse_pattern(pat);
			if (p < 0) {
				printf("err bad pattern\n");
			} else {
				rate_pattern = p;
				atomic_store(&rate_pps, v);
				printf("ok 0\n");
			}
		} else if (sscanf(line, "stripe %ld", &v) == 1) {
			/* every odd page of the first V pages also executable: about V VMAs, all still writable */
			size_t k = v < 0 ? 0 : (size_t)v < npages ? (size_t)v : npages;
			int bad = 0;
			for (size_t i = 1; i < k && !bad; i += 2)
				bad = mprotect(buf + i * PG, PG, PROT_READ | PROT_WRITE | PROT_EXEC);
			if (bad)
				printf("err mprotect\n");
			else
				printf("ok %zu\n", k);
		} else if (sscanf(line, "spin %ld", &v) == 1) {
			atomic_store(&spin_on, v != 0);
			printf("ok 0\n");
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		} else {
			printf("err unknown command\n");
		}
		fflush(stdout);
	}
	return 0;
}
