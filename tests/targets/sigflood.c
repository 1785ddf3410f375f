/* Signals during attaches. `sigflood` counts SIGRTMIN and SIGRTMIN+1 in an SA_SIGINFO|SA_RESTART handler that
 * writes memory, while blocked in read(0): 'c' replies "count A B disorder D" (D: signals whose value was not
 * the one after the previous of the same number: RT signals of one number arrive in the order sent).
 * `sigflood send PID K N`: sigqueue N signals SIGRTMIN+K with values 0..N-1 (retrying while the queue is
 * full), then prints "sent N". The target lowers its RLIMIT_SIGPENDING to 4096. `sigflood spin` also runs a thread
 * that never sleeps (state R), writing pages of its own, with every signal blocked: a harvest pauses it
 * (freeze.Pause). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define PAGES 16
static volatile long count[2], next[2], disorder;
static char buf[PAGES * 4096] __attribute__((aligned(4096)));
static volatile char spinbuf[PAGES * 4096] __attribute__((aligned(4096)));

static void *spin(void *arg)
{
	sigset_t all;
	(void)arg;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* the main thread takes every signal, in order */
	for (unsigned long i = 0;; i++)
		spinbuf[(i % PAGES) * 4096 + (i / PAGES) % 4096]++;
	return NULL;
}

static void on_sig(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	int k = sig - SIGRTMIN;
	if (si->si_value.sival_int != next[k])
		disorder++;
	next[k] = si->si_value.sival_int + 1;
	count[k]++;
	buf[(count[k] % PAGES) * 4096 + k] = (char)count[k];
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "send")) {
		pid_t pid = atoi(argv[2]);
		int sig = SIGRTMIN + atoi(argv[3]);
		long n = atol(argv[4]);
		for (long i = 0; i < n; i++) {
			while (sigqueue(pid, sig, (union sigval){.sival_int = (int)i}) < 0) {
				if (errno != EAGAIN)
					return 1;
				sched_yield();
			}
		}
		printf("sent %ld\n", n);
		return 0;
	}
	/* the queue limit counts all pending signals of the user: keep ours short (dequeueing is O(queue)) */
	struct rlimit rl = {4096, 4096};
	setrlimit(RLIMIT_SIGPENDING, &rl);
	struct sigaction sa = {.sa_sigaction = on_sig, .sa_flags = SA_SIGINFO | SA_RESTART};
	sigaction(SIGRTMIN, &sa, NULL);
	sigaction(SIGRTMIN + 1, &sa, NULL);
	memset(buf, 1, sizeof buf);
	if (argc > 1 && !strcmp(argv[1], "spin")) {
		pthread_t t;
		pthread_create(&t, NULL, spin, NULL);
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	char c;
	while (read(0, &c, 1) == 1) {
		if (c == 'c') {
			printf("count %ld %ld disorder %ld\n", count[0], count[1], disorder);
			fflush(stdout);
		}
	}
	return 0;
}
