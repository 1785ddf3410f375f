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

/* pread the byte ranges [start, end) of fd (n pairs) into buf, back to back or range i at buf + dst[i]:
 * one pread per range (looping over short reads). Returns the bytes read, short at the first range that
 * fails or ends early (the caller sees the count), or -errno (0 at end of file) when nothing could be read.
 * For /proc/PID/mem and /proc/PID/pagemap. */
int64_t wpd_pread_ranges(int fd, const uint64_t *ranges, uint64_t nranges, void *buf, uint64_t buflen,
			 const uint64_t *dst)
{
	uint64_t done = 0;

	for (uint64_t i = 0; i < nranges; i++) {
		uint64_t off = ranges[2 * i], len = ranges[2 * i + 1] - ranges[2 * i];
		uint64_t at = dst ? dst[i] : done;
		if (at > buflen || len > buflen - at)
			return done ? (int64_t)done : -ENOBUFS;
		while (len) {
			ssize_t r = pread(fd, (char *)buf + at, len, (off_t)off);
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
