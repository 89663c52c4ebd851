/* A workload holding the kernel objects restore must bring back, for
 * tests/test_restore_objects.py. Usage: objects DIR MODE
 *
 * MODE "events": an eventfd holding 7 (fd 10, never read), and an epoll (fd 14)
 * watching a second eventfd (fd 11, data 111), a periodic 50 ms timerfd (fd 12,
 * data 222) and a signalfd for SIGUSR2 (fd 13, data 333); a realtime timerfd at an
 * absolute time, cancelled on clock changes (fd 15). The main loop waits on
 * the epoll and writes DIR/status: "loops=N timer=N efd=N usr2=N".
 *
 * MODE "files": a file DIR/shared opened before fork, written by parent and child
 * through the one inherited description (and a dup of it); a deleted file (fd 20)
 * and a mapping of another deleted file; a memfd (fd 21) mapped shared, whose
 * mapping the child also writes. Status "loops=N child=N ghost_ok=N memfd=N".
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static char status_path[4096];

static void put_status(const char *text)
{
	char tmp[4200];
	snprintf(tmp, sizeof tmp, "%s.tmp", status_path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		exit(2);
	write(fd, text, strlen(text));
	close(fd);
	rename(tmp, status_path);
}

static void at(int fd, int want)
{
	if (fd != want && (dup2(fd, want) < 0 || close(fd) < 0))
		exit(3);
}

static int events(void)
{
	at(eventfd(7, EFD_NONBLOCK), 10);
	at(eventfd(0, EFD_NONBLOCK), 11);
	at(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK), 12);
	struct itimerspec its = {{0, 50000000}, {0, 50000000}};
	timerfd_settime(12, 0, &its, NULL);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR2);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	at(signalfd(-1, &mask, SFD_NONBLOCK), 13);
	at(epoll_create1(0), 14);
	/* A realtime timer at an absolute time an hour away, cancelled if the clock is set. */
	at(timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK), 15);
	struct itimerspec abs = {{0, 0}, {0, 0}};
	clock_gettime(CLOCK_REALTIME, &abs.it_value);
	abs.it_value.tv_sec += 3600;
	timerfd_settime(15, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &abs, NULL);
	int fds[] = {11, 12, 13}, data[] = {111, 222, 333};
	for (int i = 0; i < 3; i++) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data[i]};
		epoll_ctl(14, EPOLL_CTL_ADD, fds[i], &ev);
	}
	uint64_t loops = 0, timer = 0, efd = 0, usr2 = 0;
	for (;;) {
		struct epoll_event evs[4];
		int n = epoll_wait(14, evs, 4, 200);
		for (int i = 0; i < n; i++) {
			uint64_t v = 0;
			if (evs[i].data.u64 == 111 && read(11, &v, 8) == 8)
				efd += v;
			if (evs[i].data.u64 == 222 && read(12, &v, 8) == 8)
				timer += v;
			if (evs[i].data.u64 == 333) {
				struct signalfd_siginfo si;
				if (read(13, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2)
					usr2++;
			}
		}
		char line[256];
		snprintf(line, sizeof line, "loops=%lu timer=%lu efd=%lu usr2=%lu pid=%d\n",
			 (unsigned long)++loops, (unsigned long)timer, (unsigned long)efd,
			 (unsigned long)usr2, getpid());
		put_status(line);
	}
}

#define GHOST_LEN 10000

static unsigned char ghost_byte(int i) { return (unsigned char)(i * 7 + 3); }

static int files(const char *dir)
{
	char path[4200];
	snprintf(path, sizeof path, "%s/shared", dir);
	int log = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	at(log, 15);
	at(dup(15), 16);

	/* A deleted file open at fd 20, and a deleted file mapped privately. */
	snprintf(path, sizeof path, "%s/ghost", dir);
	int g = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	unsigned char buf[GHOST_LEN];
	for (int i = 0; i < GHOST_LEN; i++)
		buf[i] = ghost_byte(i);
	write(g, buf, GHOST_LEN);
	lseek(g, 1234, SEEK_SET);
	at(g, 20);
	unlink(path);
	snprintf(path, sizeof path, "%s/ghost-mapped", dir);
	int gm = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	write(gm, buf, GHOST_LEN);
	unsigned char *gmap = mmap(NULL, GHOST_LEN, PROT_READ, MAP_PRIVATE, gm, 0);
	close(gm);
	unlink(path);

	/* A memfd at fd 21 with 3 pages, mapped shared; the child bumps a counter in it. */
	at(memfd_create("objects-memfd", 0), 21);
	ftruncate(21, 3 * 4096);
	volatile uint64_t *mem = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, 21, 0);
	mem[1024] = 42; /* page 1 */

	pid_t child = fork();
	if (child == 0) {
		for (uint64_t n = 1;; n++) {
			dprintf(16, "c%lu\n", (unsigned long)n);
			mem[0] = n;
			usleep(20000);
		}
	}
	for (uint64_t loops = 1;; loops++) {
		dprintf(15, "p%lu\n", (unsigned long)loops);
		int ok = 1;
		unsigned char b[GHOST_LEN];
		if (pread(20, b, GHOST_LEN, 0) != GHOST_LEN || lseek(20, 0, SEEK_CUR) != 1234)
			ok = 0;
		for (int i = 0; ok && i < GHOST_LEN; i++)
			if (b[i] != ghost_byte(i) || gmap[i] != ghost_byte(i))
				ok = 0;
		uint64_t inmem = 0;
		pread(21, &inmem, 8, 0); /* through the fd: the same object as the mapping */
		char line[256];
		snprintf(line, sizeof line,
			 "pid=%d child_pid=%d loops=%lu child=%lu ghost_ok=%d memfd=%lu page1=%lu\n",
			 getpid(), child, (unsigned long)loops, (unsigned long)mem[0], ok,
			 (unsigned long)inmem, (unsigned long)mem[1024]);
		put_status(line);
		usleep(20000);
	}
}

/* MODE "tree": three children counting in shared memory, one a session leader
 * (setsid), one leading its own process group; a fourth child exits with status 7
 * and a fifth dies of SIGTERM, both staying zombies; an orphan in a session whose
 * leader is gone. Status "loops=N kid0=N kid1=N kid2=N orphan=N". */
static int tree(void)
{
	volatile uint64_t *kids = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
				       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pid_t pids[3];
	for (int i = 0; i < 3; i++) {
		pids[i] = fork();
		if (pids[i] == 0) {
			if (i == 1)
				setsid();
			if (i == 2)
				setpgid(0, 0);
			for (;;) {
				kids[i]++;
				usleep(20000);
			}
		}
	}
	if (fork() == 0)
		_exit(7);
	if (fork() == 0)
		raise(SIGTERM);
	/* An orphan: a child starts a session, forks, and exits (reaped); the
	 * grandchild is re-parented to us, a subreaper, in a session whose leader is
	 * gone. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	pid_t leader = fork();
	if (leader == 0) {
		setsid();
		if (fork() == 0)
			for (;;) {
				kids[3]++;
				usleep(20000);
			}
		_exit(0);
	}
	waitpid(leader, NULL, 0);
	for (uint64_t loops = 1;; loops++) {
		char line[256];
		snprintf(line, sizeof line, "loops=%lu kid0=%lu kid1=%lu kid2=%lu orphan=%lu\n",
			 (unsigned long)loops, (unsigned long)kids[0], (unsigned long)kids[1],
			 (unsigned long)kids[2], (unsigned long)kids[3]);
		put_status(line);
		usleep(20000);
	}
}

/* MODE "zombie-session": a child starts a session, forks, and exits unreaped: its
 * child (re-parented to us, a subreaper) is in a session a zombie leads.
 * Status "loops=N leader=N". */
static int zombie_session(void)
{
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	pid_t leader = fork();
	if (leader == 0) {
		setsid();
		if (fork() == 0)
			for (;;)
				pause();
		_exit(0);
	}
	for (unsigned long loops = 1;; loops++) {
		char line[64];
		snprintf(line, sizeof line, "loops=%lu leader=%d\n", loops, leader);
		put_status(line);
		usleep(20000);
	}
}

static void *spin(void *arg)
{
	volatile uint64_t *n = arg;
	for (;;) {
		(*n)++;
		char line[64];
		snprintf(line, sizeof line, "loops=%lu\n", (unsigned long)*n);
		put_status(line);
		usleep(20000);
	}
	return NULL;
}

/* MODE "zombie-leader": the main thread calls pthread_exit while a thread runs. */
static int zombie_leader(void)
{
	static uint64_t n;
	pthread_t t;
	pthread_create(&t, NULL, spin, &n);
	pthread_exit(NULL);
}

/* MODE "sysv": a SysV segment with key 0x5eed0000 + (pid & 0xffff), mapped by
 * parent and child; the child counts in it, and a second segment (key private,
 * removed with IPC_RMID while attached) holds a pattern.
 * Status "loops=N child=N shmid=N ok=N child_pid=N". */
static int sysv(void)
{
	int id = shmget(0x5eed0000 + (getpid() & 0xffff), 8192, IPC_CREAT | 0600);
	volatile uint64_t *seg = shmat(id, NULL, 0);
	int gone = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
	volatile unsigned char *pat = shmat(gone, NULL, 0);
	for (int i = 0; i < 4096; i++)
		pat[i] = (unsigned char)(i * 13);
	shmctl(gone, IPC_RMID, NULL);
	seg[1000] = 4242;
	pid_t child = fork();
	if (child == 0)
		for (;;) {
			seg[0]++;
			usleep(20000);
		}
	for (uint64_t loops = 1;; loops++) {
		int ok = seg[1000] == 4242;
		for (int i = 0; i < 4096; i++)
			ok &= pat[i] == (unsigned char)(i * 13);
		char line[256];
		snprintf(line, sizeof line, "loops=%lu child=%lu shmid=%d ok=%d child_pid=%d\n",
			 (unsigned long)loops, (unsigned long)seg[0], id, ok, child);
		put_status(line);
		usleep(20000);
	}
}

/* MODE "pty": the parent holds a pty master (fd 30) and its slave (fd 31, no
 * echo, window 33x120); a child starts a session with the slave as its controlling
 * terminal and stdin/stdout, and answers each line "ping N" with "pong N". The
 * parent pings through the master. Status "loops=N pongs=N child_pid=N". */
static int pty_pair(void)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	grantpt(m);
	unlockpt(m);
	at(m, 30);
	at(open(ptsname(30), O_RDWR | O_NOCTTY), 31);
	struct termios t;
	tcgetattr(31, &t);
	t.c_lflag &= ~(ECHO | ICANON);
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	tcsetattr(31, TCSANOW, &t);
	struct winsize ws = {.ws_row = 33, .ws_col = 120};
	ioctl(31, TIOCSWINSZ, &ws);
	pid_t child = fork();
	if (child == 0) {
		setsid();
		ioctl(31, TIOCSCTTY, 0);
		dup2(31, 0);
		dup2(31, 1);
		close(30);
		char line[64];
		size_t n = 0;
		for (;;) {
			char c;
			if (read(0, &c, 1) != 1)
				continue;
			if (c != '\n') {
				if (n < sizeof line - 1)
					line[n++] = c;
				continue;
			}
			line[n] = 0;
			n = 0;
			unsigned long k;
			if (sscanf(line, "ping %lu", &k) == 1)
				dprintf(1, "pong %lu\n", k);
		}
	}
	unsigned long pongs = 0;
	char buf[256];
	size_t have = 0;
	for (unsigned long loops = 1;; loops++) {
		dprintf(30, "ping %lu\n", loops);
		for (;;) { /* read up to the answer "pong loops" */
			ssize_t got = read(30, buf + have, sizeof buf - 1 - have);
			if (got <= 0)
				break;
			have += got;
			buf[have] = 0;
			char *nl = strchr(buf, '\n');
			if (!nl)
				continue;
			unsigned long k;
			if (sscanf(buf, "pong %lu", &k) == 1 && k == loops)
				pongs++;
			memmove(buf, nl + 1, have - (nl + 1 - buf));
			have -= nl + 1 - buf;
			break;
		}
		char line[128];
		snprintf(line, sizeof line, "loops=%lu pongs=%lu child_pid=%d\n", loops, pongs,
			 child);
		put_status(line);
		usleep(20000);
	}
}

/* MODE "shell": a job of a shell, writing "tick N" on its terminal (stdout).
 * Status "loops=N". */
static int shell_job(void)
{
	for (unsigned long loops = 1;; loops++) {
		printf("tick %lu\n", loops);
		fflush(stdout);
		char line[64];
		snprintf(line, sizeof line, "loops=%lu\n", loops);
		put_status(line);
		usleep(50000);
	}
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 1;
	snprintf(status_path, sizeof status_path, "%s/status", argv[1]);
	if (!strcmp(argv[2], "events"))
		return events();
	if (!strcmp(argv[2], "files"))
		return files(argv[1]);
	if (!strcmp(argv[2], "daemon")) { /* events, in a session whose leader exited */
		setsid();
		if (fork() > 0)
			_exit(0);
		return events();
	}
	if (!strcmp(argv[2], "shell"))
		return shell_job();
	if (!strcmp(argv[2], "pty"))
		return pty_pair();
	if (!strcmp(argv[2], "sysv"))
		return sysv();
	if (!strcmp(argv[2], "tree"))
		return tree();
	if (!strcmp(argv[2], "zombie-session"))
		return zombie_session();
	if (!strcmp(argv[2], "zombie-leader"))
		return zombie_leader();
	return 1;
}
