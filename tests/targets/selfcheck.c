/* A workload that checks its own memory, for CRIU restore tests.
 *
 *   selfcheck MIB RESULT_FILE [PAGES_PER_TICK (4) [RESERVE_MIB (0) [MEMFD_PAGES (0)]]]
 *
 * Maps MIB MiB, fills it, keeps one checksum per page in a heap array; maps RESERVE_MIB MiB of anonymous
 * memory it never touches but to check that it reads zero; with MEMFD_PAGES, a memfd of that many pages
 * mapped MAP_PRIVATE four times as long as the file (its first page written, copy-on-write, the rest
 * of the file read, the part past the end of the file never touched). Then it loops: every 10 ms it
 * rewrites PAGES_PER_TICK random pages (updating their checksums) and bumps a counter. On SIGUSR1 it verifies
 * every page against its checksum (and the reservation and the memfd mapping against what they hold) and appends "ok TICKS" or "FAIL page N" to RESULT_FILE (opened
 * and closed each time: CRIU checks the size of files a process holds open). SIGUSR2 pauses the
 * writing (echo "paused TICKS"), SIGCONT-like resume with a second SIGUSR2. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL

static unsigned char *mem;
static uint64_t *sums;
static size_t npages;
static const char *result;
static volatile sig_atomic_t check, pause_flip;
static unsigned long ticks;
static unsigned char *reserve, *mfd_map;
static size_t reserve_len, mfd_pages;

static unsigned char mfd_byte(size_t page, size_t k) { return (unsigned char)(page * 131 + k * 7 + 1); }

/* 0 when the reservation reads zero and the memfd mapping holds what was written, else a failure code */
static int check_extra(void)
{
	for (size_t i = 0; i < reserve_len; i += 8)
		if (*(uint64_t *)(reserve + i))
			return 1;
	for (size_t k = 0; k < mfd_pages * PG; k++)
		if (mfd_map[k] != (k < PG ? (unsigned char)(k ^ 0x5a) : mfd_byte(k / PG, k % PG)))
			return 2;
	return 0;
}

static uint64_t page_sum(size_t i)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t k = 0; k < PG; k++)
		h = (h ^ mem[i * PG + k]) * 1099511628211ULL;
	return h;
}

static void report(const char *text)
{
	int fd = open(result, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd >= 0) {
		(void)!write(fd, text, strlen(text));
		close(fd);
	}
}

static void on_usr1(int sig) { (void)sig; check = 1; }
static void on_usr2(int sig) { (void)sig; pause_flip = 1; }

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 6)
		return 2;
	int per_tick = argc >= 4 ? atoi(argv[3]) : 4;
	reserve_len = argc >= 5 ? (size_t)atol(argv[4]) << 20 : 0;
	mfd_pages = argc >= 6 ? (size_t)atol(argv[5]) : 0;
	if (reserve_len) {
		reserve = mmap(NULL, reserve_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (reserve == MAP_FAILED)
			return 1;
	}
	if (mfd_pages) {
		int fd = memfd_create("selfcheck", 0);
		unsigned char page[PG];
		for (size_t i = 0; fd >= 0 && i < mfd_pages; i++) {
			for (size_t k = 0; k < PG; k++)
				page[k] = mfd_byte(i, k);
			if (write(fd, page, PG) != (ssize_t)PG)
				return 1;
		}
		mfd_map = fd < 0 ? MAP_FAILED : mmap(NULL, 4 * mfd_pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (mfd_map == MAP_FAILED)
			return 1;
		for (size_t k = 0; k < PG; k++)
			mfd_map[k] = (unsigned char)(k ^ 0x5a);
		if (check_extra())
			return 1;
	}
	npages = (size_t)atol(argv[1]) * 256;
	result = argv[2];
	mem = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	sums = calloc(npages, sizeof(*sums));
	if (mem == MAP_FAILED || !sums)
		return 1;
	uint64_t s = 88172645463325252ULL;
	for (size_t i = 0; i < npages * PG; i += 8) {
		s ^= s << 13, s ^= s >> 7, s ^= s << 17;
		memcpy(mem + i, &s, 8);
	}
	for (size_t i = 0; i < npages; i++)
		sums[i] = page_sum(i);
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
	report("ready\n");
	int paused = 0;
	for (;;) {
		if (pause_flip) {
			pause_flip = 0;
			paused = !paused;
			char line[64];
			snprintf(line, sizeof(line), "%s %lu\n", paused ? "paused" : "running", ticks);
			report(line);
		}
		if (check) {
			check = 0;
			char line[64];
			size_t bad = npages;
			for (size_t i = 0; i < npages && bad == npages; i++)
				if (page_sum(i) != sums[i])
					bad = i;
			int extra = bad == npages ? check_extra() : 0;
			if (extra)
				snprintf(line, sizeof(line), "FAIL %s\n", extra == 1 ? "reservation" : "memfd");
			else if (bad == npages)
				snprintf(line, sizeof(line), "ok %lu\n", ticks);
			else
				snprintf(line, sizeof(line), "FAIL page %zu\n", bad);
			report(line);
		}
		if (!paused) {
			for (int w = 0; w < per_tick; w++) {
				s ^= s << 13, s ^= s >> 7, s ^= s << 17;
				size_t i = s % npages;
				mem[i * PG + (s >> 32) % PG] ^= (unsigned char)(s | 1);
				sums[i] = page_sum(i);
			}
			ticks++;
		}
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}
