/* Thin wrappers over the kernel operations wpdump needs: one function per operation,
 * errors returned as -errno. All policy lives in the Python package. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/aio_abi.h>
#include <linux/userfaultfd.h>

#if defined(__x86_64__)
#include "arch_x86_64.h"
#else
#error "wpdump: only x86_64 syscall injection is implemented (add native/arch_<arch>.h)"
#endif

#include "wpdump_native.h"

/* Debian 12 headers predate WP_ASYNC and PAGEMAP_SCAN (Linux 6.7). */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

struct pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

static inline long neg_errno(long r)
{
	return r < 0 ? -errno : r;
}
#define NEG_ERRNO(x) ((int)neg_errno((long)(x)))

/* ---- ptrace ---- */

int wpd_ptrace_seize(int tid, long options)
{
	return NEG_ERRNO(ptrace(PTRACE_SEIZE, tid, 0, (void *)options));
}

int wpd_ptrace_interrupt(int tid)
{
	return NEG_ERRNO(ptrace(PTRACE_INTERRUPT, tid, 0, 0));
}

int wpd_ptrace_syscall(int tid, int sig)
{
	return NEG_ERRNO(ptrace(PTRACE_SYSCALL, tid, 0, (void *)(long)sig));
}

int wpd_ptrace_cont(int tid, int sig)
{
	return NEG_ERRNO(ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig));
}

int wpd_ptrace_detach(int tid, int sig)
{
	return NEG_ERRNO(ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig));
}

int wpd_ptrace_setoptions(int tid, long options)
{
	return NEG_ERRNO(ptrace(PTRACE_SETOPTIONS, tid, 0, (void *)options));
}

int wpd_ptrace_getsiginfo(int tid, void *siginfo128)
{
	return NEG_ERRNO(ptrace(PTRACE_GETSIGINFO, tid, 0, siginfo128));
}

int wpd_rt_tgsigqueueinfo(int tgid, int tid, int sig, void *siginfo128)
{
	return NEG_ERRNO(syscall(SYS_rt_tgsigqueueinfo, tgid, tid, sig, siginfo128));
}

int wpd_ptrace_getsigmask(int tid, uint64_t *mask)
{
	return NEG_ERRNO(ptrace(PTRACE_GETSIGMASK, tid, (void *)sizeof(*mask), mask));
}

int wpd_ptrace_setsigmask(int tid, uint64_t mask)
{
	return NEG_ERRNO(ptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof(mask), &mask));
}

int wpd_waitpid(int tid, int *status, int options)
{
	pid_t r;
	do {
		r = waitpid(tid, status, __WALL | options);
	} while (r < 0 && errno == EINTR);
	return NEG_ERRNO(r);
}

int wpd_tgkill(int tgid, int tid, int sig)
{
	return NEG_ERRNO(syscall(SYS_tgkill, tgid, tid, sig));
}

size_t wpd_regs_size(void)
{
	return sizeof(wpd_regs_t);
}

/* -ENOEXEC: the thread's register set is not the native one (a 32-bit process). */
int wpd_regs_get(int tid, void *regs)
{
	struct iovec iov = {.iov_base = regs, .iov_len = sizeof(wpd_regs_t)};
	if (ptrace(PTRACE_GETREGSET, tid, (void *)NT_PRSTATUS, &iov) < 0)
		return -errno;
	return iov.iov_len == sizeof(wpd_regs_t) ? 0 : -ENOEXEC;
}

int wpd_regs_set(int tid, const void *regs)
{
	struct iovec iov = {.iov_base = (void *)regs, .iov_len = sizeof(wpd_regs_t)};
	return NEG_ERRNO(ptrace(PTRACE_SETREGSET, tid, (void *)NT_PRSTATUS, &iov));
}

void wpd_regs_prepare_syscall(void *regs, uint64_t insn_addr, long nr, uint64_t a0, uint64_t a1,
			      uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5)
{
	const uint64_t a[6] = {a0, a1, a2, a3, a4, a5};
	wpd_arch_prepare_syscall((wpd_regs_t *)regs, insn_addr, nr, a);
}

int64_t wpd_regs_syscall_result(const void *regs)
{
	return wpd_arch_syscall_result((const wpd_regs_t *)regs);
}

uint64_t wpd_regs_ip(const void *regs)
{
	return wpd_arch_ip((const wpd_regs_t *)regs);
}

int64_t wpd_regs_syscall_nr(const void *regs)
{
	return wpd_arch_syscall_nr((const wpd_regs_t *)regs);
}

void wpd_regs_restart_syscall(void *regs)
{
	wpd_arch_restart_syscall((wpd_regs_t *)regs);
}

int wpd_syscall_insn(unsigned char *buf, int buflen)
{
	if (buflen < (int)sizeof(wpd_syscall_insn_bytes))
		return -EINVAL;
	memcpy(buf, wpd_syscall_insn_bytes, sizeof(wpd_syscall_insn_bytes));
	return sizeof(wpd_syscall_insn_bytes);
}

long wpd_nr_userfaultfd(void) { return WPD_NR_USERFAULTFD; }
long wpd_nr_close(void) { return WPD_NR_CLOSE; }
long wpd_nr_madvise(void) { return WPD_NR_MADVISE; }
const char *wpd_arch_name(void) { return WPD_ARCH_NAME; }

/* ---- pidfd ---- */

int wpd_pidfd_getfd(int pidfd, int targetfd)
{
	return NEG_ERRNO((int)syscall(WPD_NR_PIDFD_GETFD, pidfd, targetfd, 0));
}

/* ---- kcmp ---- */

int wpd_kcmp(int pid1, int pid2, int type)
{
	return NEG_ERRNO((int)syscall(SYS_kcmp, pid1, pid2, type, 0, 0));
}

/* ---- userfaultfd ---- */

int wpd_userfaultfd(int flags)
{
	return NEG_ERRNO((int)syscall(WPD_NR_USERFAULTFD, flags));
}

int wpd_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	int r = ioctl(fd, UFFDIO_API, &api);
	if (r < 0)
		return -errno;
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int wpd_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
	int r = ioctl(fd, UFFDIO_REGISTER, &reg);
	if (r < 0)
		return -errno;
	*ioctls_out = reg.ioctls;
	return 0;
}

int wpd_uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect)
{
	struct uffdio_writeprotect wp = {
		.range = {.start = start, .len = len},
		.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};
	return NEG_ERRNO(ioctl(fd, UFFDIO_WRITEPROTECT, &wp));
}

/* ---- PAGEMAP_SCAN ---- */

int64_t wpd_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
			 uint64_t category_mask, uint64_t category_inverted,
			 uint64_t category_anyof_mask, uint64_t return_mask, uint64_t max_pages,
			 struct wpd_region *vec, uint64_t vec_len, uint64_t *walk_end)
{
	uint64_t n = 0;

	*walk_end = start;
	while (start < end && n < vec_len) {
		struct pm_scan_arg arg = {
			.size = sizeof(arg),
			.flags = flags,
			.start = start,
			.end = end,
			.vec = (uint64_t)(uintptr_t)(vec + n),
			.vec_len = vec_len - n,
			.max_pages = max_pages,
			.category_inverted = category_inverted,
			.category_mask = category_mask,
			.category_anyof_mask = category_anyof_mask,
			.return_mask = return_mask,
		};
		long r = ioctl(fd, PAGEMAP_SCAN, &arg);
		if (r < 0)
			return -errno;
		n += (uint64_t)r;
		/* docs/kernel.md rule 5: a call that returned fewer regions than vec_len is complete,
		 * whatever walk_end says (it can point back to a stale address). */
		if ((uint64_t)r < arg.vec_len || max_pages) {
			*walk_end = max_pages ? arg.walk_end : end;
			return (int64_t)n;
		}
		if (arg.walk_end <= start)
			return -EAGAIN; /* no progress (docs/kernel.md rule 6) */
		start = arg.walk_end;
		*walk_end = start;
	}
	if (start >= end)
		*walk_end = end;
	return (int64_t)n;
}

/* wpd_pagemap_scan over each of n ranges (ranges[2i], ranges[2i+1]) with its own return mask, one range
 * at a time (docs/kernel.md rule 4), their regions back to back in vec: counts[i] = regions of range i
 * or -errno. Stops after a range that filled vec (*walk_end < its end: resume it there). Returns the
 * number of ranges done (the last one possibly unfinished). */
int64_t wpd_pagemap_scan_ranges(int fd, const uint64_t *ranges, const uint64_t *return_masks, uint64_t n,
				uint64_t flags, uint64_t category_mask, uint64_t category_inverted,
				uint64_t category_anyof_mask, struct wpd_region *vec, uint64_t vec_len,
				int64_t *counts, uint64_t *walk_end)
{
	uint64_t used = 0;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t end = ranges[2 * i + 1];
		int64_t r = wpd_pagemap_scan(fd, ranges[2 * i], end, flags, category_mask, category_inverted,
					     category_anyof_mask, return_masks[i], 0, vec + used, vec_len - used,
					     walk_end);
		counts[i] = r;
		if (r < 0)
			continue;
		used += (uint64_t)r;
		if (*walk_end < end)
			return (int64_t)(i + 1);
	}
	return (int64_t)n;
}

/* ---- reading memory ---- */

/* Copy the target's [start, end) ranges (n pairs) into buf with process_vm_readv, up to IOV_MAX ranges a
 * call: back to back, or range i at buf + dst[i] when dst is not NULL. Returns the bytes copied, short at
 * the first range that cannot be read (the caller sees the count), or -errno when nothing was. */
int64_t wpd_read_ranges(int pid, const uint64_t *ranges, uint64_t nranges, void *buf, uint64_t buflen,
			const uint64_t *dst)
{
	struct iovec remote[IOV_MAX], local[IOV_MAX];
	uint64_t done = 0, i = 0;

	while (i < nranges) {
		uint64_t want = 0;
		int k = 0;
		while (i + k < nranges && k < IOV_MAX) {
			uint64_t len = ranges[2 * (i + k) + 1] - ranges[2 * (i + k)];
			uint64_t at = dst ? dst[i + k] : done + want;
			if (at > buflen || len > buflen - at)
				break;
			remote[k].iov_base = (void *)(uintptr_t)ranges[2 * (i + k)];
			remote[k].iov_len = len;
			local[k].iov_base = (char *)buf + at;
			local[k].iov_len = len;
			want += len;
			k++;
		}
		if (k == 0)
			return done ? (int64_t)done : -ENOBUFS;
		if (!dst) {
			local[0].iov_base = (char *)buf + done;
			local[0].iov_len = want;
		}
		ssize_t r = process_vm_readv(pid, local, dst ? (unsigned long)k : 1, remote, k, 0);
		if (r < 0)
			return done ? (int64_t)done : -errno;
		done += (uint64_t)r;
		if ((uint64_t)r < want)
			return (int64_t)done; /* a range vanished: the caller sees the short count */
		i += k;
	}
	return (int64_t)done;
}

/* preadv2 the byte ranges [start, end) of fd (n pairs) into buf, back to back or range i at buf + dst[i]:
 * one call per range (looping over short reads), with flags (0: a plain pread; RWF_NOWAIT: only what the page
 * cache holds, -EAGAIN at once for the rest). Returns the bytes read, short at the first range that fails or
 * ends early (the caller sees the count), or -errno (0 at end of file) when nothing could be read.
 * For /proc/PID/mem, /proc/PID/pagemap and CRIU's pages files. */
int64_t wpd_preadv2_ranges(int fd, const uint64_t *ranges, uint64_t nranges, void *buf, uint64_t buflen,
			   const uint64_t *dst, int flags)
{
	uint64_t done = 0;

	for (uint64_t i = 0; i < nranges; i++) {
		uint64_t off = ranges[2 * i], len = ranges[2 * i + 1] - ranges[2 * i];
		uint64_t at = dst ? dst[i] : done;
		if (at > buflen || len > buflen - at)
			return done ? (int64_t)done : -ENOBUFS;
		while (len) {
			struct iovec iov = { (char *)buf + at, len };
			ssize_t r = preadv2(fd, &iov, 1, (off_t)off, flags);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return done ? (int64_t)done : (r < 0 ? -errno : 0);
			done += (uint64_t)r;
			at += (uint64_t)r;
			off += (uint64_t)r;
			len -= (uint64_t)r;
		}
	}
	return (int64_t)done;
}

/* The /proc/PID/pagemap entries (fd) of the pages of ranges (n [start, end) pairs, page-aligned, sorted and
 * disjoint) tested page by page: match[i] = 1 when entry i (in page order) has every bit of all_of and one of
 * any_of, else 0. Ranges less than gap bytes apart are read by one pread (an entry costs ~35 ns, a pread ~1 us:
 * docs/kernel.md rule 24). Returns the pages matching, or -errno (-EIO for a short read: the mm is gone). */
int64_t wpd_pagemap_match(int fd, const uint64_t *ranges, uint64_t nranges, uint64_t page_size, uint64_t gap,
			  uint64_t all_of, uint64_t any_of, uint8_t *match)
{
	enum { CHUNK = 2048 };
	uint64_t ent[CHUNK];
	uint64_t out = 0, i = 0;
	int64_t hits = 0;

	while (i < nranges) {
		uint64_t j = i + 1;
		while (j < nranges && ranges[2 * j] - ranges[2 * j - 1] < gap)
			j++;
		uint64_t k = i, hi = ranges[2 * j - 1] / page_size;
		for (uint64_t at = ranges[2 * i] / page_size; at < hi;) {
			uint64_t cnt = hi - at < CHUNK ? hi - at : CHUNK, got = 0;
			while (got < cnt * 8) {
				ssize_t r = pread(fd, (char *)ent + got, cnt * 8 - got, (off_t)(at * 8 + got));
				if (r < 0 && errno == EINTR)
					continue;
				if (r <= 0)
					return r < 0 ? -errno : -EIO;
				got += (uint64_t)r;
			}
			for (uint64_t p = at; p < at + cnt; p++) {
				while (k < j && p >= ranges[2 * k + 1] / page_size)
					k++;
				if (k == j || p < ranges[2 * k] / page_size)
					continue; /* a gap between ranges */
				uint64_t e = ent[p - at];
				int m = (e & all_of) == all_of && (e & any_of) != 0;
				match[out++] = (uint8_t)m;
				hits += m;
			}
			at += cnt;
		}
		i = j;
	}
	return hits;
}

/* Which of npages pages of page_size bytes (a multiple of 64) at buf (8-byte aligned) hold only zero
 * bytes: is_zero[i] = 1 or 0. Returns how many do. Most pages with data differ from zero in their first
 * cache line, so a page is read only up to its first non-zero 64-byte block. */
int64_t wpd_zero_pages(const void *buf, uint64_t npages, uint64_t page_size, uint8_t *is_zero)
{
	const uint64_t *p = buf;
	const uint64_t words = page_size / 8;
	int64_t n = 0;

	for (uint64_t i = 0; i < npages; i++, p += words) {
		uint64_t acc = 0;
		for (uint64_t k = 0; k < words && !acc; k += 8)
			acc = p[k] | p[k + 1] | p[k + 2] | p[k + 3] | p[k + 4] | p[k + 5] | p[k + 6] | p[k + 7];
		is_zero[i] = acc == 0;
		n += acc == 0;
	}
	return n;
}

int wpd_ptrace_rseq_configuration(int tid, void *conf, uint32_t size)
{
	return NEG_ERRNO(ptrace(0x420f /* PTRACE_GET_RSEQ_CONFIGURATION */, tid, (void *)(long)size, conf));
}

int wpd_punch_hole(int fd, int64_t offset, int64_t len)
{
	return NEG_ERRNO(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len));
}

/* ---- asynchronous writes of the pages file (Linux AIO: io_setup, io_submit, io_getevents) ---- */

int64_t wpd_aio_setup(uint32_t nr, uint64_t *ctx)
{
	aio_context_t c = 0;

	if (syscall(SYS_io_setup, nr, &c) < 0)
		return -errno;
	*ctx = (uint64_t)c;
	return 0;
}

int wpd_aio_destroy(uint64_t ctx)
{
	return NEG_ERRNO(syscall(SYS_io_destroy, (aio_context_t)ctx));
}

/* Submit one IOCB_CMD_PWRITEV of the iovecs iov[0..niov) (struct iovec: address, length) to fd at offset
 * off, tagged data. The kernel copies the iovecs at submission; the data must stay until the completion.
 * Returns 0 or -errno. */
int wpd_aio_pwritev(uint64_t ctx, int fd, const uint64_t *iov, uint64_t niov, uint64_t off, uint64_t data)
{
	struct iocb cb;
	struct iocb *cbs[1] = {&cb};
	long r;

	memset(&cb, 0, sizeof(cb));
	cb.aio_data = data;
	cb.aio_lio_opcode = IOCB_CMD_PWRITEV;
	cb.aio_fildes = (uint32_t)fd;
	cb.aio_buf = (uint64_t)(uintptr_t)iov;
	cb.aio_nbytes = niov;
	cb.aio_offset = (int64_t)off;
	do
		r = syscall(SYS_io_submit, (aio_context_t)ctx, 1L, cbs);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	return r == 1 ? 0 : -EAGAIN;
}

/* Wait for at least min_nr and at most max_nr (<= 64) completions: data[i], res[i] (bytes written or -errno)
 * of each. Returns how many, or -errno. */
int64_t wpd_aio_wait(uint64_t ctx, int64_t min_nr, int64_t max_nr, uint64_t *data, int64_t *res)
{
	struct io_event ev[64];
	long r;

	if (max_nr > 64)
		max_nr = 64;
	do
		r = syscall(SYS_io_getevents, (aio_context_t)ctx, (long)min_nr, (long)max_nr, ev, NULL);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	for (long i = 0; i < r; i++) {
		data[i] = ev[i].data;
		res[i] = ev[i].res;
	}
	return r;
}

int wpd_fallocate(int fd, int64_t offset, int64_t len)
{
	return NEG_ERRNO(fallocate(fd, 0, offset, len));
}

/* ---- per-region work of an iteration: linear passes over numpy arrays (no kernel call) ---- */

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* n pagemap_entry messages, each u32-length-prefixed, fields vaddr (1), compat_nr_pages (2), flags (4) and
 * nr_pages (5) as varints, written to out (room for at least 48 bytes an entry). Returns the bytes written. */
int64_t wpd_pagemap_encode(const uint64_t *vaddr, const uint64_t *compat, const uint64_t *flags,
			   const uint64_t *nr, uint64_t n, uint8_t *out, uint64_t outlen)
{
	uint8_t *p = out;

	if (outlen < n * 48)
		return -ENOSPC;
	for (uint64_t i = 0; i < n; i++) {
		uint8_t *len = p;

		p += 4;
		*p++ = 0x08;
		p = put_varint(p, vaddr[i]);
		*p++ = 0x10;
		p = put_varint(p, compat[i]);
		*p++ = 0x20;
		p = put_varint(p, flags[i]);
		*p++ = 0x28;
		p = put_varint(p, nr[i]);
		len[0] = (uint8_t)(p - len - 4); /* at most 44 bytes */
		len[1] = len[2] = len[3] = 0;
	}
	return p - out;
}

/* wpd_pagemap_encode for n packed entries {u64 vaddr, u64 nr_pages, u32 flags} (20 bytes each), checked as a
 * reader checks them (page-aligned, nr_pages > 0, flags known, not both PE_PARENT and PE_PRESENT, within the
 * address space, ascending and not overlapping), compat_nr_pages the count where it fits in a u32, else 0.
 * Returns the bytes written, or -EINVAL at the first entry that breaks a rule (the caller says which). */
int64_t wpd_pagemap_encode_entries(const void *entries, uint64_t n, uint8_t *out, uint64_t outlen)
{
	const uint8_t *e = entries;
	const uint64_t max_end = (uint64_t)0 - 4096;
	uint8_t *p = out;
	uint64_t prev_end = 0;

	if (outlen < n * 48)
		return -ENOSPC;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t vaddr, nr;
		uint32_t flags;
		uint8_t *len = p;

		memcpy(&vaddr, e + 20 * i, 8);
		memcpy(&nr, e + 20 * i + 8, 8);
		memcpy(&flags, e + 20 * i + 16, 4);
		if ((vaddr & 4095) || !nr || (flags & ~7u) || !flags || (flags & 5u) == 5u || vaddr > max_end ||
		    nr > ((max_end - vaddr) >> 12) || vaddr < prev_end)
			return -EINVAL;
		prev_end = vaddr + (nr << 12);
		p += 4;
		*p++ = 0x08;
		p = put_varint(p, vaddr);
		*p++ = 0x10;
		p = put_varint(p, nr <= 0xFFFFFFFFu ? nr : 0);
		*p++ = 0x20;
		p = put_varint(p, flags);
		*p++ = 0x28;
		p = put_varint(p, nr);
		len[0] = (uint8_t)(p - len - 4);
		len[1] = len[2] = len[3] = 0;
	}
	return p - out;
}

static int get_varint(const uint8_t **pp, const uint8_t *end, uint64_t *v)
{
	const uint8_t *p = *pp;
	uint64_t x = 0;

	for (int k = 0; k < 10; k++) {
		if (p >= end)
			return -1;
		uint8_t b = *p++;
		if (k == 9 && b > 1)
			return -1;
		x |= (uint64_t)(b & 0x7f) << (7 * k);
		if (b < 0x80) {
			*pp = p;
			*v = x;
			return 0;
		}
	}
	return -1;
}

/* Parse the u32-length-prefixed pagemap_entry messages of buf[0, len) laid out as protobuf writes them:
 * varint fields in field order, vaddr (1) and compat_nr_pages (2) present, in_parent (3), flags (4) and
 * nr_pages (5) optional, nothing else. Each entry goes to entries (packed {u64 vaddr, u64 nr_pages, u32 flags},
 * 20 bytes): nr_pages, else compat_nr_pages as u32; flags as u32 with PE_PARENT added for in_parent and
 * PE_PRESENT when absent (CRIU's compat rules); offs (if not NULL) gets each payload's offset in buf. With
 * entries NULL the frames are only counted. Returns the number of entries, -EDOM for an entry breaking the
 * pagemap's rules (format._validate's: aligned, non-empty, known flags, in address order, not past 2^64), or
 * -EINVAL for anything else (more than cap entries, a truncated frame, another layout): the caller's protobuf
 * path then parses it and says what is wrong. */
int64_t wpd_pagemap_decode(const uint8_t *buf, uint64_t len, void *entries, uint64_t *offs, uint64_t cap)
{
	const uint8_t *p = buf, *end = buf + len;
	unsigned char *e = entries;
	const uint64_t max_end = ~(uint64_t)4095; /* the last page-aligned end that fits in a u64 */
	uint64_t n = 0, prev_end = 0;

	while (p < end) {
		if (end - p < 4 || n >= cap)
			return -EINVAL;
		uint64_t size = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24;
		p += 4;
		if (size > (uint64_t)(end - p))
			return -EINVAL;
		const uint8_t *m = p, *mend = p + size;

		if (e) {
			uint64_t v[6] = {0};
			int seen = 0, last = 0;

			while (m < mend) {
				int tag = *m++;
				int field = tag >> 3;
				if ((tag & 7) != 0 || field < 1 || field > 5 || field <= last)
					return -EINVAL;
				if (get_varint(&m, mend, &v[field]) < 0)
					return -EINVAL;
				seen |= 1 << field;
				last = field;
			}
			if ((seen & 6) != 6)
				return -EINVAL;
			uint32_t f = (uint32_t)v[4];
			if (v[3])
				f |= 1; /* PE_PARENT */
			else if (!(seen & (1 << 4)))
				f = 4; /* PE_PRESENT */
			uint64_t nr = (seen & (1 << 5)) ? v[5] : (v[2] & 0xffffffffu);
			/* format._validate's rules (4 KiB pages): any break leaves the message to Python */
			if ((v[1] & 4095) || !nr || (f & ~7u) || !f || (f & 5) == 5 || v[1] > max_end ||
			    nr > (max_end - v[1]) >> 12 || v[1] < prev_end)
				return -EDOM;
			prev_end = v[1] + (nr << 12);
			memcpy(e, &v[1], 8);
			memcpy(e + 8, &nr, 8);
			memcpy(e + 16, &f, 4);
			e += 20;
		}
		if (offs)
			offs[n] = (uint64_t)(p - buf);
		n++;
		p = mend;
	}
	return n;
}

static uint64_t put_range(uint64_t *out, uint64_t k, uint64_t lo, uint64_t hi)
{
	if (k && out[2 * k - 1] >= lo) {
		if (out[2 * k - 1] < hi)
			out[2 * k - 1] = hi;
		return k;
	}
	out[2 * k] = lo;
	out[2 * k + 1] = hi;
	return k + 1;
}

/* a minus b (op 0), a and b (op 1) or a or b (op 2), for na and nb [start, end) ranges (pairs of u64), each
 * sorted and disjoint. Writes merged, sorted ranges to out (room for na + nb ranges); returns how many. */
int64_t wpd_ranges_combine(const uint64_t *a, uint64_t na, const uint64_t *b, uint64_t nb, int op,
			   uint64_t *out)
{
	uint64_t j = 0, k = 0;
	const int intersect = op == 1;

	if (op == 2) {
		for (uint64_t i = 0; i < na || j < nb;) {
			const uint64_t *r = (j >= nb || (i < na && a[2 * i] <= b[2 * j])) ? &a[2 * i++] : &b[2 * j++];
			k = put_range(out, k, r[0], r[1]);
		}
		return k;
	}

	for (uint64_t i = 0; i < na; i++) {
		uint64_t s = a[2 * i], e = a[2 * i + 1];

		while (j < nb && b[2 * j + 1] <= s)
			j++;
		for (uint64_t q = j; s < e; q++) {
			uint64_t bs = q < nb ? b[2 * q] : e, be = q < nb ? b[2 * q + 1] : e;
			uint64_t lo, hi;

			if (bs >= e)
				bs = be = e;
			if (intersect) {
				lo = bs > s ? bs : s;
				hi = be < e ? be : e;
			} else {
				lo = s;
				hi = bs < e ? bs : e;
			}
			if (lo < hi)
				k = put_range(out, k, lo, hi);
			if (be >= e)
				break;
			s = be > s ? be : s;
		}
	}
	return k;
}

/* Pagemap entries (packed {u64 vaddr, u64 nr_pages, u32 flags}, 20 bytes each) for the page ranges a (flags fa)
 * and b (flags fb), 4 KiB pages: in address order, touching ranges of one flag merged. out has room for na + nb
 * entries. Returns how many, or -EINVAL when the ranges are not each sorted, page-aligned, non-empty and disjoint
 * from all others (the caller then sorts them out its slower way, which says what is wrong). */
int64_t wpd_pagemap_entries(const uint64_t *a, uint64_t na, uint32_t fa, const uint64_t *b, uint64_t nb,
			    uint32_t fb, void *out)
{
	uint8_t *o = out;
	uint64_t i = 0, j = 0, k = 0, prev_end = 0, last_v = 0, last_n = 0;
	uint32_t last_f = 0;

	while (i < na || j < nb) {
		const uint64_t *r;
		uint32_t f;

		if (j >= nb || (i < na && a[2 * i] < b[2 * j])) {
			r = &a[2 * i++];
			f = fa;
		} else {
			r = &b[2 * j++];
			f = fb;
		}
		if (((r[0] | r[1]) & 4095) || r[1] <= r[0] || r[0] < prev_end)
			return -EINVAL;
		if (k && f == last_f && last_v + (last_n << 12) == r[0]) {
			last_n += (r[1] - r[0]) >> 12;
			memcpy(o + 20 * (k - 1) + 8, &last_n, 8);
		} else {
			last_v = r[0];
			last_n = (r[1] - r[0]) >> 12;
			last_f = f;
			memcpy(o + 20 * k, &last_v, 8);
			memcpy(o + 20 * k + 8, &last_n, 8);
			memcpy(o + 20 * k + 16, &last_f, 4);
			k++;
		}
		prev_end = r[1];
	}
	return (int64_t)k;
}

/* The [start, end) ranges (pairs of u64, touching ones merged) of the n pagemap entries at entries (packed
 * {u64 vaddr, u64 nr_pages, u32 flags}, 20 bytes each, in address order) whose flags meet flag (all when
 * flag is 0), 4 KiB pages. out has room for n ranges; returns how many. */
int64_t wpd_pagemap_ranges(const void *entries, uint64_t n, uint32_t flag, uint64_t *out)
{
	const unsigned char *e = entries;
	uint64_t k = 0;

	for (uint64_t i = 0; i < n; i++, e += 20) {
		uint64_t vaddr, nr;
		uint32_t flags;

		memcpy(&vaddr, e, 8);
		memcpy(&nr, e + 8, 8);
		memcpy(&flags, e + 16, 4);
		if (flag && !(flags & flag))
			continue;
		uint64_t end = vaddr + (nr << 12);
		if (k && out[2 * k - 1] == vaddr)
			out[2 * k - 1] = end;
		else {
			out[2 * k] = vaddr;
			out[2 * k + 1] = end;
			k++;
		}
	}
	return k;
}
