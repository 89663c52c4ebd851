/*
 * A checkpoint target for the tests: a process whose memory has every kind of
 * mapping the dumper must handle, and optional writers that keep dirtying it.
 *
 *   target [--threads N] [--anon-mb N] [--hot-pages N] [--hot-sleep-us N]
 *          [--fork] [--file PATH] [--thp-mb N] [--storm] [--remap] [--state]
 *          [--exit-main|--main-exits] [--seccomp] [--rseq-cs]
 *
 * --state sets up what only injected syscalls can read back (see set_up_state()):
 * signal handlers, interval timers, umask, prctl flags, queued blocked signals, a
 * thread on an alternate signal stack, a deleted file still mapped and open. It
 * prints what it set as "STATE name value..." lines. --exit-main ends the main
 * thread with pthread_exit after READY (its leader becomes a zombie). --seccomp
 * installs a filter (before any thread starts) that kills the process on getitimer:
 * a dump must get past it without calling it for real. --rseq-cs starts a thread that
 * spins inside an rseq critical section; every abort (the kernel moves it to the
 * abort handler when it is preempted) bumps the "rseq_aborts" region's counter.
 *
 * It prints one "REGION name start size" line per region, then "READY pid",
 * and runs until killed. Region contents are deterministic (see fill()), so a
 * test can tell a faithful copy from a wrong one. Writers bump 64-bit counters
 * in their pages; a checker thread verifies that the read-only "static" region
 * never changes and exits 3 if it does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/time.h>
#include <sys/stat.h>
#include <sys/rseq.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fill.h"

static size_t anon_size, hot_pages = 0, thp_size = 0;
static long hot_sleep_us = 1000;
static unsigned char *anon, *shared, *protnone, *filemap, *thp, *statik;
static size_t file_size = 16 * PAGE;
static volatile uint64_t heartbeat;
static char **saved_argv;
static int main_exits;

static void region(const char *name, void *p, size_t len)
{
	printf("REGION %s %#lx %zu\n", name, (unsigned long)p, len);
}

static void *hot_writer(void *arg)
{
	(void)arg;
	uint64_t n = 0;
	for (;;) {
		for (size_t i = 0; i < hot_pages; i++)
			*(volatile uint64_t *)(anon + i * PAGE + 8 * (n % 512)) = n;
		n++;
		if (hot_sleep_us)
			usleep(hot_sleep_us);
	}
	return NULL;
}

static void *idle_thread(void *arg)
{
	volatile uint64_t *slot = arg;
	for (;;) {
		(*slot)++;
		usleep(2000);
	}
	return NULL;
}

static void *checker(void *arg)
{
	(void)arg;
	unsigned char *copy = malloc(16 * PAGE);
	memcpy(copy, statik, 16 * PAGE);
	for (;;) {
		if (memcmp(copy, statik, 16 * PAGE) != 0) {
			fprintf(stderr, "static region changed\n");
			_exit(3);
		}
		heartbeat++;
		usleep(1000);
	}
	return NULL;
}

/* Maps regions and touches their pages one by one for the first time, keeping the
 * last few alive and unmapping the oldest: a program that keeps growing new memory
 * while a pre-dump scans it. */
static void *churn(void *arg)
{
	(void)arg;
	/* A page every ~20 us, 5 ms a region; each region lives ~0.6 s: long enough
	 * for the next pass to see it again. */
	enum { KEEP = 128, PAGES = 256 };
	unsigned char *ring[KEEP] = { 0 };
	for (uint64_t n = 0;; n++) {
		unsigned char **slot = &ring[n % KEEP];
		if (*slot)
			munmap(*slot, PAGES * PAGE);
		*slot = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		for (size_t i = 0; i < PAGES; i++) {
			(*slot)[i * PAGE] = (unsigned char)(n + i + 1);
			struct timespec t0, t1;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			do
				clock_gettime(CLOCK_MONOTONIC, &t1);
			while ((t1.tv_sec - t0.tv_sec) * 1000000000L + t1.tv_nsec - t0.tv_nsec < 20000);
		}
	}
	return NULL;
}

/* Maps a region, touches it, and moves it whole with mremap to a fresh place, over
 * and over, as realloc of a big block or a moving allocator does. mremap refuses to
 * move a range that spans more than one VMA (EFAULT): a region the program mapped in
 * one call must stay one VMA whatever a pre-dump does meanwhile. */
static volatile uint64_t remap_failures, remap_moves;
static volatile int remap_errno;

static void *remap_churn(void *arg)
{
	uint64_t seed = (uintptr_t)arg * 2654435761u + 1;
	for (;;) {
		seed = seed * 6364136223846793005u + 1442695040888963407u;
		size_t len = (1 + (seed >> 33) % 64) * PAGE;
		unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		unsigned char *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED || to == MAP_FAILED)
			abort();
		for (size_t i = 0; i < len; i += PAGE)
			p[i] = (unsigned char)(i / PAGE + 1);
		unsigned char *got = mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
		if (got == MAP_FAILED) {
			remap_errno = errno;
			__atomic_add_fetch(&remap_failures, 1, __ATOMIC_RELAXED);
			munmap(p, len);
			got = to;
		} else {
			__atomic_add_fetch(&remap_moves, 1, __ATOMIC_RELAXED);
		}
		munmap(got, len);
	}
	return NULL;
}

/* Forks children that live a little while with memory of their own. */
static void *forker(void *arg)
{
	(void)arg;
	for (;;) {
		pid_t pid = fork();
		if (pid == 0) {
			unsigned char *mine = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE,
						   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			fill(mine, 8 * PAGE, 31);
			usleep(50000);
			_exit(0);
		}
		usleep(5000);
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
	return NULL;
}

/* A child that inherits every page of the parent and writes nothing. */
static pid_t quiet_child(void)
{
	pid_t child = fork();
	if (child == 0) {
		for (;;)
			pause();
	}
	return child;
}

static void *storm(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_t t;
		if (pthread_create(&t, NULL, (void *(*)(void *))usleep, (void *)1000) == 0)
			pthread_detach(t);
		usleep(200);
	}
	return NULL;
}

/* The target's own userfaultfd write-protection (synchronous, as a program
 * tracking its own writes would use it): a region it protects itself, and
 * unprotects around its own writes. */
static int own_uffd = -1;
static unsigned char *own_wp;
enum { OWN_WP_PAGES = 16 };

static int own_protect(int on)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = (unsigned long)own_wp, .len = OWN_WP_PAGES * PAGE },
		.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};
	return ioctl(own_uffd, UFFDIO_WRITEPROTECT, &wp);
}

static int own_wp_setup(void)
{
	own_uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (own_uffd < 0)
		return -errno;
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	if (ioctl(own_uffd, UFFDIO_API, &api))
		return -errno;
	own_wp = mmap(NULL, OWN_WP_PAGES * PAGE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(own_wp, OWN_WP_PAGES * PAGE, 37);
	struct uffdio_register reg = {
		.range = { .start = (unsigned long)own_wp, .len = OWN_WP_PAGES * PAGE },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(own_uffd, UFFDIO_REGISTER, &reg))
		return -errno;
	return own_protect(1) ? -errno : 0;
}

/* Commands on stdin let a test trigger memory-map changes on demand. */
static void *command_loop(void *arg)
{
	(void)arg;
	pthread_t t;
	for (;;) {
		char line[128];
		if (!fgets(line, sizeof line, stdin)) {
			for (;;)
				pause();
		}
		if (!strncmp(line, "remap", 5)) {
			/* Unmap the remap region and map new memory at the same address. */
			unsigned long addr = strtoul(line + 6, NULL, 0);
			munmap((void *)addr, 4 * PAGE);
			unsigned char *r = mmap((void *)addr, 4 * PAGE, PROT_READ | PROT_WRITE,
						MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			fill(r, 4 * PAGE, 23);
			printf("DONE\n");
		} else if (!strncmp(line, "mmap", 4)) {
			unsigned char *r = mmap(NULL, 16 * PAGE, PROT_READ | PROT_WRITE,
						MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			fill(r, 16 * PAGE, 29);
			printf("REGION new %#lx %zu\nDONE\n", (unsigned long)r, 16 * PAGE);
		} else if (!strncmp(line, "write", 5)) {
			/* write FIRST COUNT: dirty pages FIRST.. of the anon region */
			unsigned long first = 0, count = 0;
			sscanf(line + 5, "%lu %lu", &first, &count);
			for (unsigned long i = first; i < first + count && i * PAGE < anon_size; i++)
				anon[i * PAGE + 16] ^= 0x5A;
			printf("DONE\n");
		} else if (!strncmp(line, "dontneed", 8)) {
			unsigned long first = 0, count = 0;
			sscanf(line + 8, "%lu %lu", &first, &count);
			madvise(anon + first * PAGE, count * PAGE, MADV_DONTNEED);
			printf("DONE\n");
		} else if (!strncmp(line, "forker", 6)) {
			pthread_create(&t, NULL, forker, NULL);
			printf("DONE\n");
		} else if (!strncmp(line, "fork", 4)) {
			printf("CHILD %d\nDONE\n", quiet_child());
		} else if (!strncmp(line, "killchild", 9)) {
			/* killchild PID: kill and reap one child */
			pid_t pid = (pid_t)atol(line + 10);
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
			printf("DONE\n");
		} else if (!strncmp(line, "exec", 4)) {
			/* Run this program again in this process, with the same options. */
			printf("DONE\n");
			execv("/proc/self/exe", saved_argv);
			perror("execv");
			_exit(2);
		} else if (!strncmp(line, "movechurn", 9)) {
			/* movechurn THREADS: start remap_churn threads */
			long n = atol(line + 9);
			for (long i = 0; i < n; i++)
				pthread_create(&t, NULL, remap_churn, (void *)(i + 1));
			printf("DONE\n");
		} else if (!strncmp(line, "movecount", 9)) {
			printf("REMAPS %lu moved %lu failed errno %d\nDONE\n",
			       (unsigned long)remap_moves, (unsigned long)remap_failures, remap_errno);
		} else if (!strncmp(line, "churn", 5)) {
			pthread_create(&t, NULL, churn, NULL);
			printf("DONE\n");
		} else if (!strncmp(line, "read", 4)) {
			/* read FIRST COUNT: read pages of the anon region (a page dropped with
			 * MADV_DONTNEED comes back as the shared zero page) */
			unsigned long first = 0, count = 0;
			volatile unsigned char sum = 0;
			sscanf(line + 4, "%lu %lu", &first, &count);
			for (unsigned long i = first; i < first + count && i * PAGE < anon_size; i++)
				sum += anon[i * PAGE + 16];
			printf("DONE\n");
		} else if (!strncmp(line, "move", 4)) {
			/* move FIRST COUNT: mremap pages of the anon region to a new address */
			unsigned long first = 0, count = 0;
			sscanf(line + 4, "%lu %lu", &first, &count);
			void *to = mmap(NULL, count * PAGE, PROT_NONE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			void *got = mremap(anon + first * PAGE, count * PAGE, count * PAGE,
					   MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (got == MAP_FAILED) {
				perror("mremap");
				_exit(2);
			}
			printf("REGION moved %#lx %lu\nDONE\n", (unsigned long)got, count * PAGE);
		} else if (!strncmp(line, "hugetlb", 7)) {
			/* a 2 MiB MAP_HUGETLB region, touched */
			unsigned char *h = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE,
						MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
			if (h == MAP_FAILED) {
				printf("NOHUGETLB %d\nDONE\n", errno);
			} else {
				memset(h, 0x42, 2 << 20);
				printf("REGION hugetlb %#lx %d\nDONE\n", (unsigned long)h, 2 << 20);
			}
		} else if (!strncmp(line, "ownwp", 5)) {
			int err = own_wp_setup();
			if (err)
				printf("NOUFFD %d\nDONE\n", -err);
			else
				printf("REGION ownwp %#lx %lu\nDONE\n", (unsigned long)own_wp,
				       (unsigned long)(OWN_WP_PAGES * PAGE));
		} else if (!strncmp(line, "ownwrite", 8)) {
			/* unprotect, write every page, protect again */
			own_protect(0);
			for (size_t i = 0; i < OWN_WP_PAGES; i++)
				own_wp[i * PAGE + 8]++;
			own_protect(1);
			printf("DONE\n");
		} else if (!strncmp(line, "sparse", 6)) {
			/* a 64 MiB memfd mapped shared with one page written in its middle */
			size_t size = 64 << 20;
			int fd = memfd_create("sparse", MFD_CLOEXEC);
			ftruncate(fd, size);
			unsigned char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			fill(m + size / 2, PAGE, 41);
			printf("REGION sparse %#lx %zu\nFD %d\nDONE\n", (unsigned long)m, size, fd);
		} else if (!strncmp(line, "pastend ", 8)) {
			/* pastend PATH: map 4 pages of a 1-page file shared and writable, write
			 * the first; the other 3 lie past end of file */
			char *path = line + 8;
			path[strcspn(path, "\n")] = 0;
			int fd = open(path, O_RDWR);
			unsigned char *m = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
			close(fd);
			fill(m, PAGE, 43);
			printf("REGION pastend %#lx %lu\nDONE\n", (unsigned long)m, (unsigned long)(4 * PAGE));
		} else if (!strncmp(line, "brk", 3)) {
			printf("BRK %#lx\nDONE\n", (unsigned long)sbrk(0));
		} else if (!strncmp(line, "mprotect", 8)) {
			unsigned long first = 0, count = 0;
			sscanf(line + 8, "%lu %lu", &first, &count);
			mprotect(anon + first * PAGE, count * PAGE, PROT_READ);
			printf("DONE\n");
		}
	}
	return NULL;
}

/* rseq_spin(&rseq->rseq_cs, &descriptor): arm the critical section [cs_start,
 * cs_post) and spin in it; return only through the abort handler. */
__asm__(".text\n"
	".globl rseq_spin, cs_start, cs_post, cs_abort\n"
	"rseq_spin:\n"
	"	mov %rsi, (%rdi)\n"
	"cs_start:\n"
	"	jmp cs_start\n"
	"cs_post:\n"
	"	ret\n"
	"	.long 0x53053053\n" /* RSEQ_SIG, right before the abort ip */
	"cs_abort:\n"
	"	ret\n");
void rseq_spin(volatile uint64_t *rseq_cs, struct rseq_cs *cs);
extern char cs_start[], cs_post[], cs_abort[];
static volatile uint64_t rseq_aborts;

static void *rseq_thread(void *arg)
{
	(void)arg;
	static struct rseq_cs cs __attribute__((aligned(32)));
	cs.start_ip = (uintptr_t)cs_start;
	cs.post_commit_offset = (uintptr_t)cs_post - (uintptr_t)cs_start;
	cs.abort_ip = (uintptr_t)cs_abort;
	struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
	for (;;) {
		rseq_spin((volatile uint64_t *)&rs->rseq_cs, &cs);
		rseq_aborts++;
	}
	return NULL;
}

static volatile sig_atomic_t usr1_count;

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
	(void)sig, (void)info, (void)ctx;
	usr1_count++;
}

static void on_trap(int sig)
{
	(void)sig;
}

static volatile int altstack_ready;

static void *altstack_thread(void *arg)
{
	(void)arg;
	static char altstack[4 * PAGE] __attribute__((aligned(16)));
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
	sigaltstack(&ss, NULL);
	pthread_setname_np(pthread_self(), "altstack-thr");
	printf("STATE altstack %d %#lx %zu\n", gettid(), (unsigned long)altstack, sizeof altstack);
	altstack_ready = 1;
	for (;;)
		pause();
	return NULL;
}

/* Everything the final dump reads by injected syscalls, set to values that are not
 * the defaults, and printed for the test to compare. Called before any thread
 * starts, so the signal mask (SIGUSR2 blocked) is every thread's. */
static void set_up_state(void)
{
	struct sigaction sa = { .sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART };
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGUSR2);
	sigaddset(&sa.sa_mask, SIGTERM);
	sigaction(SIGUSR1, &sa, NULL);
	printf("STATE usr1 %#lx\n", (unsigned long)on_usr1);
	signal(SIGTRAP, on_trap);
	signal(SIGPIPE, SIG_IGN);

	struct itimerval real = { .it_interval = { 500, 0 }, .it_value = { 1000, 0 } };
	signal(SIGALRM, SIG_IGN);
	setitimer(ITIMER_REAL, &real, NULL);
	struct itimerval prof = { .it_interval = { 0, 250000 }, .it_value = { 2000, 0 } };
	setitimer(ITIMER_PROF, &prof, NULL);

	umask(027);
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	sigprocmask(SIG_BLOCK, &block, NULL);
	union sigval value = { .sival_int = 4242 };
	sigqueue(getpid(), SIGUSR2, value); /* process-wide queue */
	value.sival_int = 77;
	pthread_sigqueue(pthread_self(), SIGUSR2, value); /* the main thread's own queue */

	char path[] = "/tmp/checkpointer-deleted-XXXXXX";
	int fd = mkostemp(path, O_CLOEXEC);
	unsigned char page[PAGE];
	for (int i = 0; i < 4; i++) {
		memset(page, 'a' + i, sizeof page);
		if (write(fd, page, sizeof page) != sizeof page)
			_exit(2);
	}
	void *mapped = mmap(NULL, 4 * PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
	unlink(path);
	struct stat st;
	fstat(fd, &st);
	printf("STATE deleted %s %d %#lx %lu %lu\n", path, fd, (unsigned long)mapped,
	       (unsigned long)st.st_dev, (unsigned long)st.st_ino);

	pthread_t t;
	pthread_create(&t, NULL, altstack_thread, NULL);
	while (!altstack_ready) /* its STATE line comes before READY */
		usleep(100);
}

static void install_seccomp(void)
{
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getitimer, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof filter / sizeof filter[0], .filter = filter };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("seccomp");
		_exit(2);
	}
}


int main(int argc, char **argv)
{
	saved_argv = argv;
	int threads = 2, do_fork = 0, do_storm = 0, do_remap = 0, do_state = 0;
	int do_seccomp = 0, do_rseq = 0;
	const char *file = NULL;
	anon_size = 8 << 20;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--threads")) threads = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--anon-mb")) anon_size = (size_t)atol(argv[++i]) << 20;
		else if (!strcmp(argv[i], "--hot-pages")) hot_pages = atol(argv[++i]);
		else if (!strcmp(argv[i], "--hot-sleep-us")) hot_sleep_us = atol(argv[++i]);
		else if (!strcmp(argv[i], "--thp-mb")) thp_size = (size_t)atol(argv[++i]) << 20;
		else if (!strcmp(argv[i], "--fork")) do_fork = 1;
		else if (!strcmp(argv[i], "--storm")) do_storm = 1;
		else if (!strcmp(argv[i], "--remap")) do_remap = 1;
		else if (!strcmp(argv[i], "--main-exits")) main_exits = 1;
		else if (!strcmp(argv[i], "--state")) do_state = 1;
		else if (!strcmp(argv[i], "--exit-main")) main_exits = 1;
		else if (!strcmp(argv[i], "--seccomp")) do_seccomp = 1;
		else if (!strcmp(argv[i], "--rseq-cs")) do_rseq = 1;
		else if (!strcmp(argv[i], "--file")) file = argv[++i];
		else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!thp_size)
		/* Kernels with THP "always" (Debian's) would back the regions with huge
		 * pages, and dirty tracking would then count 512 pages per write. */
		prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);

	anon = mmap(NULL, anon_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(anon, anon_size, 0);
	/* Leave a never-touched tail: it must read back as zeros, not be dumped. */
	region("anon", anon, anon_size);

	statik = mmap(NULL, 16 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(statik, 16 * PAGE, 7);
	region("static", statik, 16 * PAGE);

	unsigned char *untouched = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	region("untouched", untouched, 64 * PAGE);

	shared = mmap(NULL, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	fill(shared, 32 * PAGE, 3);
	region("shared", shared, 32 * PAGE);

	protnone = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(protnone, 8 * PAGE, 5);
	mprotect(protnone, 8 * PAGE, PROT_NONE);
	region("protnone", protnone, 8 * PAGE);

	char *heap = malloc(100 * 1024); /* below the mmap threshold: lives in [heap] */
	fill((unsigned char *)heap, 96 * 1024, 11);
	region("heap", heap, 96 * 1024);

	if (file) {
		int fd = open(file, O_RDONLY);
		if (fd < 0) { perror(file); return 2; }
		filemap = mmap(NULL, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		close(fd);
		volatile unsigned char sum = 0;
		for (size_t off = 0; off < file_size; off += PAGE)
			sum += filemap[off]; /* read every page: present but clean */
		for (size_t off = 0; off < file_size; off += 4 * PAGE)
			memset(filemap + off, 0xAB, 100); /* written: private copies */
		region("file", filemap, file_size);
	}

	if (thp_size) {
		size_t align = 2 << 20;
		unsigned char *raw = mmap(NULL, thp_size + align, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		thp = (unsigned char *)(((uintptr_t)raw + align - 1) & ~(align - 1));
		madvise(thp, thp_size, MADV_HUGEPAGE);
		fill(thp, thp_size, 13);
		region("thp", thp, thp_size);
	}

	if (do_remap) {
		/* Unmap then map at the same address with new contents. */
		unsigned char *r = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		fill(r, 4 * PAGE, 17);
		region("remap", r, 4 * PAGE);
	}

	if (do_seccomp)
		install_seccomp();
	if (do_state)
		set_up_state();

	static volatile uint64_t slots[64];
	pthread_t t;
	for (int i = 0; i < threads; i++)
		pthread_create(&t, NULL, idle_thread, (void *)&slots[i % 64]);
	pthread_create(&t, NULL, checker, NULL);
	if (hot_pages)
		pthread_create(&t, NULL, hot_writer, NULL);
	if (do_rseq) {
		pthread_create(&t, NULL, rseq_thread, NULL);
		region("rseq_aborts", (void *)&rseq_aborts, sizeof rseq_aborts);
		printf("STATE rseq_cs %#lx %#lx %#lx\n", (unsigned long)cs_start,
		       (unsigned long)cs_post, (unsigned long)cs_abort);
	}
	if (do_storm)
		pthread_create(&t, NULL, storm, NULL);

	if (do_fork) {
		pid_t child = fork();
		if (child == 0) {
			/* The child dirties its own copy of the static region's neighbour. */
			unsigned char *mine = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE,
						   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			fill(mine, 4 * PAGE, 19);
			for (;;)
				pause();
		}
		printf("CHILD %d\n", child);
	}

	region("heartbeat", (void *)&heartbeat, sizeof(heartbeat));
	printf("READY %d\n", getpid());
	if (main_exits) {
		/* The main thread leaves while the others run: the process lives on
		 * with a zombie thread-group leader. */
		pthread_create(&t, NULL, command_loop, NULL);
		pthread_exit(NULL);
	}
	command_loop(NULL);
}
