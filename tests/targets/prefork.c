/* A prefork server that checks its own memory, for process-tree tests (and CRIU restores of them).
 *
 *   prefork RESULT_FILE WORKERS PRIVATE_PAGES SHARED_PAGES [PAGES_PER_TICK (2)]
 *
 * The master maps SHARED_PAGES of MAP_SHARED|MAP_ANONYMOUS memory, then forks WORKERS workers. Every process
 * maps and fills PRIVATE_PAGES of its own private memory (one checksum per page, kept in its own memory); each
 * worker owns one slot of the shared region (SHARED_PAGES / 16 pages) and keeps checksums of it. Every 10 ms a
 * process that is not paused rewrites PAGES_PER_TICK random private pages and one page of its slot.
 * Lines are appended to RESULT_FILE as "PID WHAT ..." (PID as the process sees it: in its pid namespace),
 * the file opened and closed each time (CRIU checks the size of files a process holds open):
 *   SIGUSR1   verify every private page and its slot: "PID ok TICKS" or "PID FAIL ..."
 *   SIGUSR2   pause / resume writing: "PID paused TICKS" / "PID running TICKS" (a worker forked later
 *             starts as its master is then)
 *   SIGRTMIN  burst: write the next 32 private pages in turn (distinct until the region wraps): "PID burst N"
 *   SIGHUP    (master) fork one more worker: "PID spawned CHILD"; the worker says "CHILD ready"
 *   SIGTERM   (worker) exit; the master reaps it: "PID reaped CHILD"
 */
#define _GNU_SOURCE
#include <errno.h>
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
#define SLOTS 16
#define BURST 32

static const char *result;
static unsigned char *priv, *shared;
static uint64_t *sums, *slot_sums;
static size_t npriv, nshared, slot_pages, cursor;
static int per_tick = 2;
static int slot = -1, is_master = 1;
static int slot_used[SLOTS];
static pid_t slot_pid[SLOTS];
static volatile sig_atomic_t check, pause_flip, burst, spawn, reap;
static unsigned long ticks;
static uint64_t rng;

static uint64_t next(void) { rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17; return rng; }

static uint64_t sum(const unsigned char *p)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t k = 0; k < PG; k++)
		h = (h ^ p[k]) * 1099511628211ULL;
	return h;
}

static void report(const char *fmt, unsigned long a)
{
	char line[96];
	int n = snprintf(line, sizeof(line), "%d ", (int)getpid());
	n += snprintf(line + n, sizeof(line) - n, fmt, a);
	int fd = open(result, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd >= 0) {
		(void)!write(fd, line, n);
		close(fd);
	}
}

static void write_priv(size_t i)
{
	for (size_t k = 0; k < PG; k += 64)
		priv[i * PG + k] = (unsigned char)next();
	sums[i] = sum(priv + i * PG);
}

static void write_slot(size_t j)
{
	unsigned char *p = shared + (slot * slot_pages + j) * PG;
	for (size_t k = 0; k < PG; k += 128)
		p[k] = (unsigned char)next();
	slot_sums[j] = sum(p);
}

/* this process's own memory: a private region (and, for a worker, its shared slot) filled anew */
static int setup(void)
{
	rng = 88172645463325252ULL ^ ((uint64_t)getpid() << 20) ^ (uint64_t)time(NULL);
	priv = mmap(NULL, npriv * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	sums = calloc(npriv, sizeof(*sums));
	slot_sums = calloc(slot_pages ? slot_pages : 1, sizeof(*slot_sums));
	if (priv == MAP_FAILED || !sums || !slot_sums)
		return -1;
	for (size_t i = 0; i < npriv; i++)
		write_priv(i);
	for (size_t j = 0; slot >= 0 && j < slot_pages; j++)
		write_slot(j);
	return 0;
}

static void on_usr1(int s) { (void)s; check = 1; }
static void on_usr2(int s) { (void)s; pause_flip = 1; }
static void on_rt(int s) { (void)s; burst = 1; }
static void on_hup(int s) { (void)s; spawn = 1; }
static void on_chld(int s) { (void)s; reap = 1; }

static void worker_loop(int paused);

static pid_t fork_worker(int paused)
{
	int s = 0;
	while (s < SLOTS && slot_used[s])
		s++;
	if (s == SLOTS)
		s = -1;
	pid_t c = fork();
	if (c == 0) {
		is_master = 0;
		slot = s;
		signal(SIGHUP, SIG_IGN);
		signal(SIGCHLD, SIG_DFL);
		signal(SIGTERM, SIG_DFL);
		if (setup() < 0)
			_exit(1);
		report("ready\n", 0);
		worker_loop(paused);
	}
	if (c > 0 && s >= 0) {
		slot_used[s] = 1;
		slot_pid[s] = c;
	}
	return c;
}

static void worker_loop(int paused)
{
	for (;;) {
		if (pause_flip) {
			pause_flip = 0;
			paused = !paused;
			report(paused ? "paused %lu\n" : "running %lu\n", ticks);
		}
		if (check) {
			check = 0;
			size_t bad = npriv, bad_slot = slot_pages;
			for (size_t i = 0; i < npriv && bad == npriv; i++)
				if (sum(priv + i * PG) != sums[i])
					bad = i;
			for (size_t j = 0; slot >= 0 && j < slot_pages && bad_slot == slot_pages; j++)
				if (sum(shared + (slot * slot_pages + j) * PG) != slot_sums[j])
					bad_slot = j;
			if (bad != npriv)
				report("FAIL private page %lu\n", bad);
			else if (slot >= 0 && bad_slot != slot_pages)
				report("FAIL shared page %lu\n", bad_slot);
			else
				report("ok %lu\n", ticks);
		}
		if (burst) {
			burst = 0;
			for (int b = 0; b < BURST; b++) {
				write_priv(cursor);
				cursor = (cursor + 1) % npriv;
			}
			report("burst %lu\n", BURST);
		}
		if (is_master && reap) {
			reap = 0;
			pid_t c;
			while ((c = waitpid(-1, NULL, WNOHANG)) > 0) {
				for (int s = 0; s < SLOTS; s++)
					if (slot_used[s] && slot_pid[s] == c)
						slot_used[s] = 0;
				report("reaped %lu\n", (unsigned long)c);
			}
		}
		if (is_master && spawn) {
			spawn = 0;
			pid_t c = fork_worker(paused);
			report("spawned %lu\n", (unsigned long)c);
		}
		if (!paused) {
			for (int w = 0; w < per_tick; w++)
				write_priv(next() % npriv);
			if (slot >= 0 && slot_pages)
				write_slot(next() % slot_pages);
			ticks++;
		}
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}

int main(int argc, char **argv)
{
	if (argc < 5)
		return 2;
	result = argv[1];
	int workers = atoi(argv[2]);
	npriv = (size_t)atol(argv[3]);
	nshared = (size_t)atol(argv[4]);
	slot_pages = nshared / SLOTS;
	if (argc > 5)
		per_tick = atoi(argv[5]);
	shared = mmap(NULL, (nshared ? nshared : 1) * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		return 1;
	struct sigaction sa = {0};
	sa.sa_flags = SA_RESTART;
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_rt;
	sigaction(SIGRTMIN, &sa, NULL);
	sa.sa_handler = on_hup;
	sigaction(SIGHUP, &sa, NULL);
	sa.sa_handler = on_chld;
	sigaction(SIGCHLD, &sa, NULL);
	if (setup() < 0)
		return 1;
	for (int i = 0; i < workers; i++)
		if (fork_worker(0) < 0)
			return 1;
	report("ready\n", 0);
	worker_loop(0);
	return 0;
}
