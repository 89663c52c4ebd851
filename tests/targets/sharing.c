/*
 * A parent and a child made by clone() sharing one kernel object that two
 * processes (not threads) can share: its memory (CLONE_VM, as a vfork child has
 * until it execs), its fd table (CLONE_FILES) or its cwd, root and umask
 * (CLONE_FS).
 *
 *   sharing vm|files|fs
 *
 * Prints the child's PID once it runs, then both loop until killed.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile long ticks;

static int child(void *arg)
{
	(void)arg;
	for (;;) {
		ticks++;
		usleep(1000);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	int flag = !strcmp(argv[1], "vm") ? CLONE_VM : !strcmp(argv[1], "files") ? CLONE_FILES
		 : !strcmp(argv[1], "fs") ? CLONE_FS : 0;
	if (!flag)
		return 2;
	size_t size = 1 << 20;
	char *stack = malloc(size);
	pid_t pid = clone(child, stack + size, SIGCHLD | flag, NULL);
	if (pid < 0)
		return 1;
	printf("%d\n", pid);
	fflush(stdout);
	for (;;)
		pause();
}
