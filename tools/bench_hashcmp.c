/* Hash-compare iterations for tools/bench: the alternative to dirty tracking that reads every page.
 *
 *   bench_hashcmp PID
 *
 * Prints "ready PID", then serves commands on stdin (one reply line each):
 *   prime RANGES         hash every page of the ranges (nothing written) -> "ok PAGES 0 READ_NS HASH_NS 0 TOTAL_NS"
 *   iter RANGES OUT      read every page of the ranges, compare its hash with the previous iteration's,
 *                        append the pages that differ (or are new) to the new file OUT, fsync it
 *                        -> "ok PAGES CHANGED READ_NS HASH_NS WRITE_NS TOTAL_NS"
 *   quit
 * RANGES is a file of native uint64 pairs [start, end), page-aligned, sorted. Pages are read with
 * process_vm_readv (8 MiB contiguous chunks, as fast as this call goes), hashed 64 bits per page
 * (4 lanes of multiply-rotate, xxh64's round), and the changed pages written with O_DIRECT (falling
 * back to buffered writes where the filesystem refuses it) in chunks of up to 8 MiB: the same write
 * path as wpdump's. Hashes are kept sorted by address, as the previous iteration left them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PG 4096UL
#define CHUNK (8UL << 20)

static const uint64_t P1 = 0x9E3779B185EBCA87ULL, P2 = 0xC2B2AE3D27D4EB4FULL;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t rotl(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static uint64_t hash_page(const uint64_t *w)
{
	uint64_t a = P1, b = P2, c = 0, d = P1 ^ P2;
	for (int i = 0; i < 512; i += 4) {
		a = rotl(a + w[i] * P2, 31) * P1;
		b = rotl(b + w[i + 1] * P2, 31) * P1;
		c = rotl(c + w[i + 2] * P2, 31) * P1;
		d = rotl(d + w[i + 3] * P2, 31) * P1;
	}
	uint64_t h = rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18);
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	return h;
}

struct table {
	uint64_t *addr, *hash;
	size_t n, cap;
};

static int push(struct table *t, uint64_t addr, uint64_t hash)
{
	if (t->n == t->cap) {
		size_t cap = t->cap ? 2 * t->cap : 1 << 16;
		uint64_t *a = realloc(t->addr, cap * 8), *h = a ? realloc(t->hash, cap * 8) : NULL;
		if (!a || !h) {
			if (a)
				t->addr = a;
			return -1;
		}
		t->addr = a;
		t->hash = h;
		t->cap = cap;
	}
	t->addr[t->n] = addr;
	t->hash[t->n++] = hash;
	return 0;
}

static struct table prev, cur;
static unsigned char *buf, *out;
static size_t outlen;
static int outfd = -1, direct;

static int flush_out(void)
{
	size_t done = 0;
	while (done < outlen) {
		ssize_t r = write(outfd, out + done, outlen - done);
		if (r < 0 && errno == EINVAL && direct) { /* no O_DIRECT here: go on buffered */
			fcntl(outfd, F_SETFL, fcntl(outfd, F_GETFL) & ~O_DIRECT);
			direct = 0;
			continue;
		}
		if (r <= 0)
			return -1;
		done += (size_t)r;
	}
	outlen = 0;
	return 0;
}

static uint64_t *load_ranges(const char *path, size_t *n)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		return NULL;
	uint64_t *r = malloc(st.st_size ? st.st_size : 8);
	size_t got = 0;
	while (r && got < (size_t)st.st_size) {
		ssize_t k = read(fd, (char *)r + got, st.st_size - got);
		if (k <= 0) {
			free(r);
			r = NULL;
			break;
		}
		got += (size_t)k;
	}
	close(fd);
	*n = st.st_size / 16;
	return r;
}

/* One pass over the ranges; write changed pages to outfd when it is open. */
static int pass(int pid, const uint64_t *r, size_t nr, uint64_t t[4], size_t *pages, size_t *changed)
{
	size_t j = 0; /* position in prev (sorted by address) */
	cur.n = 0;
	*pages = *changed = 0;
	for (size_t i = 0; i < nr; i++) {
		for (uint64_t a = r[2 * i]; a < r[2 * i + 1];) {
			uint64_t len = r[2 * i + 1] - a < CHUNK ? r[2 * i + 1] - a : CHUNK;
			struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)a, len};
			uint64_t t0 = now_ns();
			ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
			uint64_t t1 = now_ns();
			t[0] += t1 - t0;
			if (got < 0)
				got = 0; /* vanished: skip the rest of the range */
			for (size_t k = 0; k < (size_t)got / PG; k++) {
				uint64_t addr = a + k * PG, h = hash_page((const uint64_t *)(buf + k * PG));
				while (j < prev.n && prev.addr[j] < addr)
					j++;
				int same = j < prev.n && prev.addr[j] == addr && prev.hash[j] == h;
				if (push(&cur, addr, h) < 0)
					return -1;
				(*pages)++;
				if (!same && outfd >= 0) {
					(*changed)++;
					uint64_t t2 = now_ns();
					memcpy(out + outlen, buf + k * PG, PG);
					outlen += PG;
					if (outlen == CHUNK && flush_out() < 0)
						return -1;
					t[2] += now_ns() - t2;
				} else if (!same) {
					(*changed)++;
				}
			}
			t[1] += now_ns() - t1;
			if ((uint64_t)got < len)
				break;
			a += len;
		}
	}
	struct table tmp = prev;
	prev = cur;
	cur = tmp;
	return 0;
}

int main(int argc, char **argv)
{
	int pid = argc > 1 ? atoi(argv[1]) : 0;
	if (pid <= 0) {
		fprintf(stderr, "usage: %s PID\n", argv[0]);
		return 2;
	}
	buf = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	out = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (buf == MAP_FAILED || out == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	char line[8192], a1[4096], a2[4096];
	while (fgets(line, sizeof(line), stdin)) {
		int n = sscanf(line, "%*s %4095s %4095s", a1, a2);
		size_t nr = 0, pages = 0, changed = 0;
		uint64_t t[4] = {0, 0, 0, 0}, t0 = now_ns();
		if (!strncmp(line, "quit", 4))
			return 0;
		int iter = !strncmp(line, "iter ", 5);
		if ((!iter && strncmp(line, "prime ", 6)) || n < (iter ? 2 : 1)) {
			printf("err bad command\n");
			fflush(stdout);
			continue;
		}
		uint64_t *r = load_ranges(a1, &nr);
		if (!r) {
			printf("err cannot read %s: %s\n", a1, strerror(errno));
			fflush(stdout);
			continue;
		}
		if (iter) {
			outfd = open(a2, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_DIRECT, 0600);
			direct = outfd >= 0;
			if (outfd < 0 && errno == EINVAL)
				outfd = open(a2, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
			if (outfd < 0) {
				printf("err cannot create %s: %s\n", a2, strerror(errno));
				fflush(stdout);
				free(r);
				continue;
			}
		}
		int rc = pass(pid, r, nr, t, &pages, &changed);
		if (iter) {
			uint64_t t2 = now_ns();
			if (rc == 0)
				rc = flush_out();
			if (rc == 0)
				rc = fsync(outfd);
			close(outfd);
			outfd = -1;
			outlen = 0;
			t[3] += now_ns() - t2;
		}
		free(r);
		if (rc < 0)
			printf("err %s\n", strerror(errno));
		else
			printf("ok %zu %zu %llu %llu %llu %llu\n", pages, changed, (unsigned long long)t[0],
			       (unsigned long long)(t[1] - t[2]), (unsigned long long)(t[2] + t[3]),
			       (unsigned long long)(now_ns() - t0));
		fflush(stdout);
	}
	return 0;
}
