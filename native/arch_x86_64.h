/* x86_64 part of syscall injection: register layout, syscall numbers, instruction bytes. */
#ifndef WPD_ARCH_X86_64_H
#define WPD_ARCH_X86_64_H

#include <stdint.h>
#include <string.h>
#include <sys/user.h>

typedef struct user_regs_struct wpd_regs_t;

#define WPD_ARCH_NAME "x86_64"
#define WPD_NR_CLOSE 3
#define WPD_NR_MADVISE 28
#define WPD_NR_USERFAULTFD 323
#define WPD_NR_PIDFD_GETFD 438

/* `syscall` */
static const unsigned char wpd_syscall_insn_bytes[] = {0x0f, 0x05};

static inline void wpd_arch_prepare_syscall(wpd_regs_t *r, uint64_t ip, long nr,
                                            const uint64_t a[6])
{
	r->rip = ip;
	r->rax = (uint64_t)nr;
	/* orig_rax = -1: the kernel must not apply syscall-restart logic to our registers */
	r->orig_rax = (uint64_t)-1;
	r->rdi = a[0];
	r->rsi = a[1];
	r->rdx = a[2];
	r->r10 = a[3];
	r->r8 = a[4];
	r->r9 = a[5];
}

static inline int64_t wpd_arch_syscall_result(const wpd_regs_t *r) { return (int64_t)r->rax; }
static inline uint64_t wpd_arch_ip(const wpd_regs_t *r) { return r->rip; }
static inline int64_t wpd_arch_syscall_nr(const wpd_regs_t *r) { return (int64_t)r->orig_rax; }

/* Point the thread back at the `syscall` it returned from, to execute it again (rax = what to run). */
static inline void wpd_arch_restart_syscall(wpd_regs_t *r)
{
	r->rax = r->orig_rax;
	r->rip -= sizeof(wpd_syscall_insn_bytes);
}

#endif
