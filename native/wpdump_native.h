/* The native helper's API: the cdef of wpdump._native is read from this file. */
#ifndef WPD_NATIVE_H
#define WPD_NATIVE_H
#include <stddef.h>
#include <stdint.h>

struct wpd_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

int wpd_ptrace_seize(int tid, long options);
int wpd_ptrace_interrupt(int tid);
int wpd_ptrace_syscall(int tid, int sig);
int wpd_ptrace_cont(int tid, int sig);
int wpd_ptrace_detach(int tid, int sig);
int wpd_ptrace_setoptions(int tid, long options);
int wpd_ptrace_getsiginfo(int tid, void *siginfo128);
int wpd_rt_tgsigqueueinfo(int tgid, int tid, int sig, void *siginfo128);
int wpd_ptrace_getsigmask(int tid, uint64_t *mask);
int wpd_ptrace_setsigmask(int tid, uint64_t mask);
int wpd_ptrace_rseq_configuration(int tid, void *conf, uint32_t size);
int wpd_waitpid(int tid, int *status, int options);
int wpd_tgkill(int tgid, int tid, int sig);
size_t wpd_regs_size(void);
int wpd_regs_get(int tid, void *regs);
int wpd_regs_set(int tid, const void *regs);
void wpd_regs_prepare_syscall(void *regs, uint64_t insn_addr, long nr, uint64_t a0, uint64_t a1,
			      uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
int64_t wpd_regs_syscall_result(const void *regs);
uint64_t wpd_regs_ip(const void *regs);
int64_t wpd_regs_syscall_nr(const void *regs);
void wpd_regs_restart_syscall(void *regs);
int wpd_syscall_insn(unsigned char *buf, int buflen);
long wpd_nr_userfaultfd(void);
long wpd_nr_close(void);
long wpd_nr_madvise(void);
const char *wpd_arch_name(void);

int wpd_pidfd_getfd(int pidfd, int targetfd);
int wpd_kcmp(int pid1, int pid2, int type);

int wpd_userfaultfd(int flags);
int wpd_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int wpd_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int wpd_uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect);

int64_t wpd_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags,
			 uint64_t category_mask, uint64_t category_inverted,
			 uint64_t category_anyof_mask, uint64_t return_mask, uint64_t max_pages,
			 struct wpd_region *vec, uint64_t vec_len, uint64_t *walk_end);
int64_t wpd_pagemap_scan_ranges(int fd, const uint64_t *ranges, const uint64_t *return_masks, uint64_t n,
				uint64_t flags, uint64_t category_mask, uint64_t category_inverted,
				uint64_t category_anyof_mask, struct wpd_region *vec, uint64_t vec_len,
				int64_t *counts, uint64_t *walk_end);

int64_t wpd_read_ranges(int pid, const uint64_t *ranges, uint64_t nranges, void *buf,
			uint64_t buflen, const uint64_t *dst);
int64_t wpd_preadv2_ranges(int fd, const uint64_t *ranges, uint64_t nranges, void *buf, uint64_t buflen,
			   const uint64_t *dst, int flags);
int64_t wpd_zero_pages(const void *buf, uint64_t npages, uint64_t page_size, uint8_t *is_zero);
int64_t wpd_pagemap_match(int fd, const uint64_t *ranges, uint64_t nranges, uint64_t page_size, uint64_t gap,
			  uint64_t all_of, uint64_t any_of, uint8_t *match);
int wpd_punch_hole(int fd, int64_t offset, int64_t len);
int wpd_fallocate(int fd, int64_t offset, int64_t len);
int64_t wpd_aio_setup(uint32_t nr, uint64_t *ctx);
int wpd_aio_destroy(uint64_t ctx);
int wpd_aio_pwritev(uint64_t ctx, int fd, const uint64_t *iov, uint64_t niov, uint64_t off, uint64_t data);
int64_t wpd_aio_wait(uint64_t ctx, int64_t min_nr, int64_t max_nr, uint64_t *data, int64_t *res);

int64_t wpd_pagemap_encode(const uint64_t *vaddr, const uint64_t *compat, const uint64_t *flags,
			   const uint64_t *nr, uint64_t n, uint8_t *out, uint64_t outlen);
int64_t wpd_pagemap_encode_entries(const void *entries, uint64_t n, uint8_t *out, uint64_t outlen);
int64_t wpd_pagemap_decode(const uint8_t *buf, uint64_t len, void *entries, uint64_t *offs, uint64_t cap);
int64_t wpd_pagemap_ranges(const void *entries, uint64_t n, uint32_t flag, uint64_t *out);
int64_t wpd_pagemap_entries(const uint64_t *a, uint64_t na, uint32_t fa, const uint64_t *b, uint64_t nb,
			    uint32_t fb, void *out);
int64_t wpd_ranges_combine(const uint64_t *a, uint64_t na, const uint64_t *b, uint64_t nb, int op,
			   uint64_t *out);
#endif
