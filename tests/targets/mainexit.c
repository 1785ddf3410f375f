/* The main thread calls pthread_exit() while another thread runs on (zdtm's pthread02): the thread-group
 * leader is a zombie, the process is alive. Prints "ready" once the leader is gone. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *worker(void *arg)
{
	(void)arg;
	sleep(1);
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
	return NULL;
}

int main(void)
{
	pthread_t t;
	pthread_create(&t, NULL, worker, NULL);
	pthread_exit(NULL);
}
