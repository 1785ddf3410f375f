/* A fork and exit storm, for process-tree tests.
 *
 *   storm RESULT_FILE MAX_CHILDREN
 *
 * The master fills 64 private pages (one checksum each) and loops: reaps its children, forks a new child
 * whenever fewer than MAX_CHILDREN live, rewrites one of its pages. A child maps and fills 8 pages of its
 * own, writes a page of the master's memory it inherited (copy-on-write: the master's copy must stay as it
 * was), lives 1-30 ms rewriting its pages, verifies them and the inherited region, and exits 0 (3 when a
 * page is wrong). The master counts children that exited non-zero or were killed. SIGUSR1 (master): verify
 * its own pages, append "ok FORKS FAILS" or "FAIL page N" to RESULT_FILE.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define MASTER_PAGES 64
#define CHILD_PAGES 8

static volatile sig_atomic_t check;
static uint64_t rng = 88172645463325252ULL;

static uint64_t next(void) { rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17; return rng; }

static uint64_t sum(const unsigned char *p)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t k = 0; k < PG; k++)
		h = (h ^ p[k]) * 1099511628211ULL;
	return h;
}

static void fill(unsigned char *p, uint64_t *s)
{
	for (size_t k = 0; k < PG; k += 32)
		p[k] = (unsigned char)next();
	*s = sum(p);
}

static void on_usr1(int sig) { (void)sig; check = 1; }

static int child(unsigned char *master, uint64_t *msums)
{
	rng ^= (uint64_t)getpid() << 17;
	unsigned char *mem = mmap(NULL, CHILD_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t sums[CHILD_PAGES];
	if (mem == MAP_FAILED)
		return 1;
	for (int i = 0; i < CHILD_PAGES; i++)
		fill(mem + i * PG, &sums[i]);
	size_t own = next() % MASTER_PAGES;  /* the child's copy of one inherited page */
	fill(master + own * PG, &msums[own]);
	long life = 1 + (long)(next() % 30);
	struct timespec end, now;
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_nsec += life * 1000000L;
	end.tv_sec += end.tv_nsec / 1000000000L;
	end.tv_nsec %= 1000000000L;
	do {
		int i = (int)(next() % CHILD_PAGES);
		fill(mem + i * PG, &sums[i]);
		struct timespec ts = {0, 500 * 1000};
		nanosleep(&ts, NULL);
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while (now.tv_sec < end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec < end.tv_nsec));
	for (int i = 0; i < CHILD_PAGES; i++)
		if (sum(mem + i * PG) != sums[i])
			return 3;
	for (int i = 0; i < MASTER_PAGES; i++)
		if (sum(master + i * PG) != msums[i])
			return 3;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	const char *result = argv[1];
	int max = atoi(argv[2]);
	unsigned char *mem = mmap(NULL, MASTER_PAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t sums[MASTER_PAGES];
	if (mem == MAP_FAILED)
		return 1;
	for (int i = 0; i < MASTER_PAGES; i++)
		fill(mem + i * PG, &sums[i]);
	struct sigaction sa = {0};
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	unsigned long forks = 0, fails = 0;
	int alive = 0;
	int fd = open(result, O_WRONLY | O_CREAT | O_APPEND, 0644);
	(void)!write(fd, "ready\n", 6);
	close(fd);
	for (;;) {
		int st;
		pid_t c;
		while ((c = waitpid(-1, &st, WNOHANG)) > 0) {
			alive--;
			if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
				fails++;
		}
		while (alive < max) {
			c = fork();
			if (c == 0)
				_exit(child(mem, sums));
			if (c < 0)
				break;
			alive++;
			forks++;
		}
		int i = (int)(next() % MASTER_PAGES);
		fill(mem + i * PG, &sums[i]);
		if (check) {
			check = 0;
			char line[96];
			int bad = -1;
			for (int k = 0; k < MASTER_PAGES && bad < 0; k++)
				if (sum(mem + k * PG) != sums[k])
					bad = k;
			int n = bad < 0 ? snprintf(line, sizeof(line), "ok %lu %lu\n", forks, fails)
					: snprintf(line, sizeof(line), "FAIL page %d\n", bad);
			fd = open(result, O_WRONLY | O_CREAT | O_APPEND, 0644);
			(void)!write(fd, line, n);
			close(fd);
		}
		struct timespec ts = {0, 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}
