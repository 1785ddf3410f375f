/* A test target that changes its memory on command: one command per line on stdin, one reply
 * line ("ok ..." or "err ...") on stdout. Addresses are hex, counts are pages. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096UL

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static int prot_of(const char *s)
{
	if (!strcmp(s, "none"))
		return PROT_NONE;
	if (!strcmp(s, "r"))
		return PROT_READ;
	if (!strcmp(s, "w"))
		return PROT_WRITE;
	if (!strcmp(s, "x"))
		return PROT_EXEC;
	return PROT_READ | PROT_WRITE;
}

/* ---- writer threads (no-lost-update test) ---- */
static atomic_ulong seq;
static atomic_int stop_writers;
static char *wr_base;
static unsigned long wr_pages;
static pthread_t writers[64];
static int nwriters;
static atomic_ulong writes_done;

static void *writer(void *arg)
{
	unsigned long id = (unsigned long)arg;
	unsigned int r = (unsigned int)(id * 2654435761u + 1);
	while (!atomic_load_explicit(&stop_writers, memory_order_relaxed)) {
		r = r * 1103515245u + 12345u;
		unsigned long pg = (r >> 8) % wr_pages;
		unsigned long v = atomic_fetch_add(&seq, 1) + 1;
		volatile unsigned long *slot = (volatile unsigned long *)(wr_base + pg * PG) + id;
		*slot = v;
		atomic_fetch_add_explicit(&writes_done, 1, memory_order_relaxed);
	}
	return NULL;
}

/* ---- layout churn: mmap / MAP_FIXED / mremap / munmap in a loop ---- */
static atomic_int stop_churn;
static pthread_t churner;
static atomic_ulong churns;

static void *churn(void *arg)
{
	while (!atomic_load(&stop_churn)) {
		char *p = mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			abort();
		memset(p, 1, 8 * PG);
		mmap(p + 2 * PG, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
		p[2 * PG] = 2;
		mprotect(p + 6 * PG, PG, PROT_READ);
		char *q = mremap(p + 4 * PG, 2 * PG, 6 * PG, MREMAP_MAYMOVE);
		if (q != MAP_FAILED) {
			q[5 * PG] = 3;
			munmap(q, 6 * PG);
		}
		munmap(p, 8 * PG);
		atomic_fetch_add(&churns, 1);
	}
	return NULL;
}

/* ---- io_uring fixed buffers (raw syscalls: no liburing needed) ---- */
struct io_uring_params_min {
	uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
	uint64_t sq_off[5], cq_off[5];
};

static int uring_fd = -1;

/* ---- a read in a thread of its own (bgread / joinread) ---- */
static pthread_t reader;
static char read_path[256];
static void *read_buf;
static size_t read_len;
static long read_result;

static void *read_thread(void *arg)
{
	int fd = open(read_path, O_RDONLY);
	read_result = fd < 0 ? -errno : pread(fd, read_buf, read_len, 0);
	if (read_result < 0 && fd >= 0)
		read_result = -errno;
	if (fd >= 0)
		close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	char line[4096], cmd[64];
	setvbuf(stdin, NULL, _IOLBF, 0);
	reply("ready %d", getpid());
	while (fgets(line, sizeof line, stdin)) {
		unsigned long a = 0, b = 0, c = 0;
		char s1[256] = "", s2[256] = "";
		if (sscanf(line, "%63s", cmd) != 1)
			continue;
		if (!strcmp(cmd, "map")) {
			sscanf(line, "%*s %lu %255s", &a, s1);
			int flags = MAP_ANONYMOUS | (strcmp(s1, "shared") ? MAP_PRIVATE : MAP_SHARED);
			if (!strcmp(s1, "hugetlb"))
				flags |= MAP_HUGETLB;
			void *p = mmap(NULL, a * PG, PROT_READ | PROT_WRITE, flags, -1, 0);
			if (p == MAP_FAILED)
				reply("err %d", errno);
			else
				reply("ok %lx", (unsigned long)p);
		} else if (!strcmp(cmd, "secret")) { /* secret PAGES: memfd_secret memory, written */
			sscanf(line, "%*s %lu", &a);
			int fd = (int)syscall(447 /* memfd_secret */, 0);
			void *p = fd < 0 || ftruncate(fd, (off_t)(a * PG)) ? MAP_FAILED
				  : mmap(NULL, a * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			if (fd >= 0)
				close(fd);
			if (p == MAP_FAILED) {
				reply("err %d", errno);
			} else {
				memset(p, 0x5e, a * PG);
				reply("ok %lx", (unsigned long)p);
			}
		} else if (!strcmp(cmd, "mapfile")) { /* mapfile PATH PAGES private|shared */
			sscanf(line, "%*s %255s %lu %255s", s1, &a, s2);
			int fd = open(s1, O_RDWR);
			void *p = fd < 0 ? MAP_FAILED
					 : mmap(NULL, a * PG, PROT_READ | PROT_WRITE,
						strcmp(s2, "shared") ? MAP_PRIVATE : MAP_SHARED, fd, 0);
			if (fd >= 0)
				close(fd);
			if (p == MAP_FAILED)
				reply("err %d", errno);
			else
				reply("ok %lx", (unsigned long)p);
		} else if (!strcmp(cmd, "fill")) { /* fill ADDR PAGES SEED: every byte of every page */
			sscanf(line, "%*s %lx %lu %lu", &a, &b, &c);
			for (unsigned long i = 0; i < b; i++) {
				unsigned char *p = (unsigned char *)(a + i * PG);
				for (unsigned long k = 0; k < PG; k++)
					p[k] = (unsigned char)(c * 131 + i * 7 + k * 13 + (k >> 8));
			}
			reply("ok");
		} else if (!strcmp(cmd, "poke")) { /* poke ADDR i,j,k,...: one byte in each listed page */
			char *list = NULL;
			sscanf(line, "%*s %lx %ms", &a, &list);
			for (char *t = strtok(list, ","); t; t = strtok(NULL, ","))
				(*(volatile unsigned char *)(a + strtoul(t, NULL, 10) * PG))++;
			free(list);
			reply("ok");
		} else if (!strcmp(cmd, "read")) { /* read ADDR PAGES: read every page, reply the sum */
			sscanf(line, "%*s %lx %lu", &a, &b);
			unsigned long sum = 0;
			for (unsigned long i = 0; i < b * PG; i += 64)
				sum += *(volatile unsigned char *)(a + i);
			reply("ok %lu", sum);
		} else if (!strcmp(cmd, "hash")) { /* hash ADDR PAGES: FNV-1a of every byte, its own check */
			sscanf(line, "%*s %lx %lu", &a, &b);
			unsigned long h = 1469598103934665603UL;
			for (unsigned long i = 0; i < b * PG; i++)
				h = (h ^ *(volatile unsigned char *)(a + i)) * 1099511628211UL;
			reply("ok %lx", h);
		} else if (!strcmp(cmd, "madvise")) { /* madvise ADDR PAGES dontneed|free|pageout|cold */
			sscanf(line, "%*s %lx %lu %255s", &a, &b, s1);
			int adv = !strcmp(s1, "free") ? MADV_FREE : !strcmp(s1, "pageout") ? MADV_PAGEOUT
				: !strcmp(s1, "populate_write") ? 23 /* MADV_POPULATE_WRITE */
				: !strcmp(s1, "guard") ? 102 /* MADV_GUARD_INSTALL */ : MADV_DONTNEED;
			if (madvise((void *)a, b * PG, adv))
				reply("err %d", errno);
			else
				reply("ok");
		} else if (!strcmp(cmd, "brk")) { /* brk PAGES: grow the heap, reply the old break */
			sscanf(line, "%*s %lu", &a);
			void *old = sbrk((intptr_t)(a * PG));
			if (old == (void *)-1)
				reply("err %d", errno);
			else
				reply("ok %lx", (unsigned long)old);
		} else if (!strcmp(cmd, "fixed")) { /* fixed ADDR PAGES: new anon mapping over it */
			sscanf(line, "%*s %lx %lu", &a, &b);
			void *p = mmap((void *)a, b * PG, PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			if (p == MAP_FAILED)
				reply("err %d", errno);
			else
				reply("ok %lx", (unsigned long)p);
		} else if (!strcmp(cmd, "mremap")) { /* mremap ADDR OLD NEW [ADDR2]: grow/move */
			unsigned long to = 0;
			int n = sscanf(line, "%*s %lx %lu %lu %lx", &a, &b, &c, &to);
			void *p = n == 4 ? mremap((void *)a, b * PG, c * PG, MREMAP_MAYMOVE | MREMAP_FIXED,
						  (void *)to)
					 : mremap((void *)a, b * PG, c * PG, MREMAP_MAYMOVE);
			if (p == MAP_FAILED)
				reply("err %d", errno);
			else
				reply("ok %lx", (unsigned long)p);
		} else if (!strcmp(cmd, "munmap")) {
			sscanf(line, "%*s %lx %lu", &a, &b);
			reply(munmap((void *)a, b * PG) ? "err" : "ok");
		} else if (!strcmp(cmd, "mprotect")) {
			sscanf(line, "%*s %lx %lu %255s", &a, &b, s1);
			reply(mprotect((void *)a, b * PG, prot_of(s1)) ? "err" : "ok");
		} else if (!strcmp(cmd, "stripe")) { /* stripe ADDR PAGES: every odd page read-only (a VMA each) */
			sscanf(line, "%*s %lx %lu", &a, &b);
			int bad = 0;
			for (unsigned long i = 1; i < b && !bad; i += 2)
				bad = mprotect((void *)(a + i * PG), PG, PROT_READ);
			if (bad)
				reply("err %d", errno);
			else
				reply("ok");
		} else if (!strcmp(cmd, "fork")) { /* fork ADDR PAGES: the child writes them, then waits */
			sscanf(line, "%*s %lx %lu", &a, &b);
			pid_t ch = fork();
			if (ch == 0) {
				for (unsigned long i = 0; i < b; i++)
					((volatile char *)a)[i * PG] ^= 0x5a;
				pause();
				_exit(0);
			}
			reply("ok %d", ch);
		} else if (!strcmp(cmd, "exec")) {
			reply("ok");
			execl("/bin/sleep", "sleep", "600", (char *)NULL);
			reply("err %d", errno);
		} else if (!strcmp(cmd, "exit")) {
			reply("ok");
			exit(0);
		} else if (!strcmp(cmd, "threads")) { /* threads N ADDR PAGES: random writers */
			sscanf(line, "%*s %lu %lx %lu", &c, &a, &b);
			wr_base = (char *)a;
			wr_pages = b;
			atomic_store(&stop_writers, 0);
			for (nwriters = 0; nwriters < (int)c && nwriters < 64; nwriters++)
				pthread_create(&writers[nwriters], NULL, writer, (void *)(unsigned long)nwriters);
			reply("ok");
		} else if (!strcmp(cmd, "stopthreads")) {
			atomic_store(&stop_writers, 1);
			for (int i = 0; i < nwriters; i++)
				pthread_join(writers[i], NULL);
			nwriters = 0;
			reply("ok %lu", atomic_load(&writes_done));
		} else if (!strcmp(cmd, "churn")) {
			atomic_store(&stop_churn, 0);
			pthread_create(&churner, NULL, churn, NULL);
			reply("ok");
		} else if (!strcmp(cmd, "stopchurn")) {
			atomic_store(&stop_churn, 1);
			pthread_join(churner, NULL);
			reply("ok %lu", atomic_load(&churns));
		} else if (!strcmp(cmd, "writes")) {
			reply("ok %lu", atomic_load(&writes_done));
		} else if (!strcmp(cmd, "uffd")) { /* uffd ADDR PAGES: register our own userfaultfd */
			sscanf(line, "%*s %lx %lu", &a, &b);
			int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
			struct uffdio_api api = {.api = UFFD_API};
			struct uffdio_register reg = {.range = {.start = a, .len = b * PG},
						      .mode = UFFDIO_REGISTER_MODE_MISSING};
			if (fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg))
				reply("err %d", errno);
			else
				reply("ok %d", fd);
		} else if (!strcmp(cmd, "iouring")) { /* iouring ADDR PAGES: register a fixed buffer */
			sscanf(line, "%*s %lx %lu", &a, &b);
			struct io_uring_params_min p;
			memset(&p, 0, sizeof p);
			uring_fd = (int)syscall(425 /* io_uring_setup */, 4, &p);
			struct iovec iov = {.iov_base = (void *)a, .iov_len = b * PG};
			if (uring_fd < 0 || syscall(427 /* io_uring_register */, uring_fd, 0, &iov, 1))
				reply("err %d", errno);
			else
				reply("ok %d", uring_fd);
		} else if (!strcmp(cmd, "bgread")) { /* bgread PATH ADDR PAGES: pread in a thread */
			sscanf(line, "%*s %255s %lx %lu", read_path, &a, &b);
			read_buf = (void *)a;
			read_len = b * PG;
			pthread_create(&reader, NULL, read_thread, NULL);
			reply("ok");
		} else if (!strcmp(cmd, "joinread")) {
			pthread_join(reader, NULL);
			reply("ok %ld", read_result);
		} else {
			reply("err unknown %s", cmd);
		}
	}
	return 0;
}
