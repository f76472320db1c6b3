/* chronoray-launch: start one script in its sandbox with a single exec.
 *
 * Does what the util-linux chain `setpriv --pdeathsig=KILL -- unshare --pid
 * --fork --kill-child --setuid U --setgid G -- prlimit ... -- CMD` does, in
 * one small process instead of three (each util-linux exec costs about
 * 1.5 ms of CPU here, which at 100 scripts/s on 2 cores is what limits the
 * fire lag). The executor compiles it on first use (actors/sandbox.py) and
 * falls back to that chain when no C compiler is present.
 *
 *   chronoray-launch [--cgroup=PROCS_FILE]... [--pidns] [--netns] [--scratch=BYTES]
 *                    [--nice=N] [--uid=N --gid=N] [--hold=FD] [--cpu=N] [--as=N]
 *                    [--fsize=N] [--nofile=N] [--nproc=N] [--core=N] -- CMD ARGS...
 *   chronoray-launch --serve=REQUESTS,EVENTS    (the fork server: see serve below)
 *
 * Dies with its parent (PR_SET_PDEATHSIG). With --pidns, CMD runs as PID 1 of
 * a new PID namespace in a child that dies with this process, so killing this
 * process (or its process group) ends every process CMD started. With
 * --netns, CMD runs in a new network namespace whose only interface is its
 * own loopback, brought up here (the network policy `none`). Each --cgroup
 * names a run cgroup's cgroup.procs: this process joins it first, so the
 * script and everything it starts are counted and limited there. With
 * --scratch, CMD runs in a mount namespace of its own where /tmp is a tmpfs
 * of that many bytes, owned by the script's uid, also bound over /var/tmp
 * and /dev/shm (the places every user may write), and is started there; the
 * script (CMD's last argument) is opened first and passed as /dev/fd/N,
 * since /tmp, where it lies, is covered. --nice sets CMD's nice value (the
 * tier's CPU weight). With --hold, everything above is done and then CMD's
 * exec waits on one byte from FD (a pipe the executor keeps the other end
 * of): the executor builds the sandbox ahead of the due instant and writes
 * that byte on it, so the script's first line follows within an exec. End
 * of file instead (the executor closed the pipe: cancelled, fenced, or
 * dead) exits HELD_DISCARDED and runs nothing. The exit
 * status is CMD's; a CMD killed by a signal makes this process die of it too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <poll.h>
#include <stdint.h>
#include <sys/signalfd.h>
#include <sys/uio.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static const struct {
    const char *flag;
    int resource;
} LIMITS[] = {
    {"--cpu=", RLIMIT_CPU},       {"--as=", RLIMIT_AS},       {"--fsize=", RLIMIT_FSIZE},
    {"--nofile=", RLIMIT_NOFILE}, {"--nproc=", RLIMIT_NPROC}, {"--core=", RLIMIT_CORE},
};

#define HELD_DISCARDED 125

/* Wait for the executor's go; run nothing unless it came. */
static void await_release(int fd) {
    char go;
    ssize_t n;
    do {
        n = read(fd, &go, 1);
    } while (n == -1 && errno == EINTR);
    if (n != 1) _exit(HELD_DISCARDED);
    close(fd);
}

static void die(const char *what) {
    fprintf(stderr, "chronoray-launch: %s: %s\n", what, strerror(errno));
    _exit(127);
}

static int set_limit(const char *arg) {
    for (size_t i = 0; i < sizeof LIMITS / sizeof LIMITS[0]; i++) {
        size_t n = strlen(LIMITS[i].flag);
        if (strncmp(arg, LIMITS[i].flag, n) == 0) {
            rlim_t value = (rlim_t)strtoull(arg + n, NULL, 10);
            struct rlimit limit = {value, value};
            if (setrlimit(LIMITS[i].resource, &limit) == -1) die(arg);
            return 1;
        }
    }
    return 0;
}

static void join_cgroup(const char *procs) {
    FILE *file = fopen(procs, "w");
    if (file == NULL) die(procs);
    if (fprintf(file, "%d\n", (int)getpid()) < 0 || fclose(file) != 0) die(procs);
}

static void own_network(void) {
    if (unshare(CLONE_NEWNET) == -1) die("unshare network");
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    if (sock == -1) die("socket");
    struct ifreq lo;
    memset(&lo, 0, sizeof lo);
    strncpy(lo.ifr_name, "lo", IFNAMSIZ - 1);
    if (ioctl(sock, SIOCGIFFLAGS, &lo) == -1) die("loopback flags");
    lo.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &lo) == -1) die("loopback up");
    close(sock);
}

static void own_scratch(unsigned long long bytes, long uid, long gid, char **script) {
    static char by_fd[32];
    int fd = open(*script, O_RDONLY);
    if (fd == -1) die(*script);
    snprintf(by_fd, sizeof by_fd, "/dev/fd/%d", fd);
    *script = by_fd;
    if (unshare(CLONE_NEWNS) == -1) die("unshare mounts");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) == -1) die("private mounts");
    char options[128];
    snprintf(options, sizeof options, "size=%llu,mode=0700,uid=%ld,gid=%ld", bytes,
             uid >= 0 ? uid : 0, gid >= 0 ? gid : 0);
    if (mount("chronoray-scratch", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options) == -1)
        die("scratch tmpfs");
    static const char *const ALSO[] = {"/var/tmp", "/dev/shm"};
    for (size_t k = 0; k < sizeof ALSO / sizeof ALSO[0]; k++) {
        if (access(ALSO[k], F_OK) == 0 && mount("/tmp", ALSO[k], NULL, MS_BIND, NULL) == -1)
            die(ALSO[k]);
    }
    if (chdir("/tmp") == -1) die("chdir /tmp");
}

static int launch(int argc, char **argv) {
    int pidns = 0, netns = 0, hold = -1;
    unsigned long long scratch = 0;
    long uid = -1, gid = -1;
    int i = 1;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) == -1) die("prctl");
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--pidns") == 0) {
            pidns = 1;
        } else if (strcmp(argv[i], "--netns") == 0) {
            netns = 1;
        } else if (strncmp(argv[i], "--nice=", 7) == 0) {
            if (setpriority(PRIO_PROCESS, 0, atoi(argv[i] + 7)) == -1) die("setpriority");
        } else if (strncmp(argv[i], "--scratch=", 10) == 0) {
            scratch = strtoull(argv[i] + 10, NULL, 10);
        } else if (strncmp(argv[i], "--cgroup=", 9) == 0) {
            join_cgroup(argv[i] + 9);
        } else if (strncmp(argv[i], "--uid=", 6) == 0) {
            uid = atol(argv[i] + 6);
        } else if (strncmp(argv[i], "--gid=", 6) == 0) {
            gid = atol(argv[i] + 6);
        } else if (strncmp(argv[i], "--hold=", 7) == 0) {
            hold = atoi(argv[i] + 7);
        } else if (!set_limit(argv[i])) {
            fprintf(stderr, "chronoray-launch: unknown option %s\n", argv[i]);
            return 127;
        }
    }
    if (i >= argc) {
        fprintf(stderr, "chronoray-launch: no command\n");
        return 127;
    }
    if (netns) own_network();
    if (scratch > 0) own_scratch(scratch, uid, gid, &argv[argc - 1]);
    if (pidns) {
        if (unshare(CLONE_NEWPID) == -1) die("unshare");
        pid_t child = fork();
        if (child == -1) die("fork");
        if (child > 0) {
            int status;
            while (waitpid(child, &status, 0) == -1) {
                if (errno != EINTR) die("waitpid");
            }
            if (WIFSIGNALED(status)) {
                signal(WTERMSIG(status), SIG_DFL);
                kill(getpid(), WTERMSIG(status));
            }
            return WIFEXITED(status) ? WEXITSTATUS(status) : 127;
        }
        /* PID 1 of the namespace: dies with the launcher, and with it
         * everything in the namespace. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) == -1) die("prctl");
    }
    if (gid >= 0) {
        if (setgroups(0, NULL) == -1) die("setgroups");
        if (setgid((gid_t)gid) == -1) die("setgid");
    }
    if (uid >= 0 && setuid((uid_t)uid) == -1) die("setuid");
    if (hold >= 0) await_release(hold);
    execvp(argv[i], argv + i);
    die(argv[i]);
    return 127;
}

/* The fork server (--serve=REQUESTS,EVENTS): one per executor, started once,
 * so that a run costs a fork of this small process instead of the executor's
 * Popen and an exec of the launcher. Each request on REQUESTS is one
 * SOCK_SEQPACKET message: the working directory, the number of environment
 * entries, the entries, then the launcher's arguments (argv[0] first), each
 * NUL-terminated; with SCM_RIGHTS the run's output pipe and, for a held run,
 * its go pipe (the child finds it as HOLD_FD). The child does what one exec
 * of this launcher does, in a session of its own; the reply is its pid, or
 * -errno. Every child's end is reaped here and reported on EVENTS as
 * {pid, wait status}. End of file on REQUESTS (the executor is done, or
 * dead) ends the server, and with it (PR_SET_PDEATHSIG) each run it began. */
#define MAX_REQUEST (256 * 1024)
#define HOLD_FD 3

extern char **environ;

static char **split_fields(char *at, char *end, size_t count) {
    char **fields = calloc(count + 1, sizeof *fields);
    if (fields == NULL) die("calloc");
    for (size_t k = 0; k < count && at < end; k++) {
        fields[k] = at;
        at += strlen(at) + 1;
    }
    return fields;
}

static size_t count_fields(const char *at, const char *end) {
    size_t count = 0;
    for (; at < end; at += strlen(at) + 1) count++;
    return count;
}

static void start_run(char *request, size_t length, int out, int hold, int ready) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* the server blocks SIGCHLD; the run must not */
    if (setsid() == -1) die("setsid");
    close(ready); /* its group exists: the executor may kill it by its pid from now on */
    int null = open("/dev/null", O_RDONLY);
    if (null == -1 || dup2(null, 0) == -1 || dup2(out, 1) == -1 || dup2(out, 2) == -1)
        die("stdio");
    if (hold >= 0 && dup2(hold, HOLD_FD) == -1) die("hold");
    close_range(hold >= 0 ? HOLD_FD + 1 : HOLD_FD, ~0U, 0);
    char *end = request + length;
    char *cwd = request;
    char *at = cwd + strlen(cwd) + 1;
    if (at >= end) _exit(127);
    size_t env_count = strtoul(at, NULL, 10);
    at += strlen(at) + 1;
    char **env = split_fields(at, end, env_count);
    for (size_t k = 0; k < env_count && at < end; k++) at += strlen(at) + 1;
    size_t argc = count_fields(at, end);
    char **argv = split_fields(at, end, argc);
    if (chdir(cwd) == -1) die(cwd);
    environ = env;
    _exit(launch((int)argc, argv));
}

static void report_exits(int events) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int32_t report[2] = {pid, status};
        (void)send(events, report, sizeof report, MSG_NOSIGNAL);
    }
}

static int serve(const char *sockets) {
    int requests, events;
    if (sscanf(sockets, "%d,%d", &requests, &events) != 2) {
        fprintf(stderr, "chronoray-launch: --serve=REQUESTS,EVENTS\n");
        return 127;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) == -1) die("prctl");
    sigset_t child_ends;
    sigemptyset(&child_ends);
    sigaddset(&child_ends, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &child_ends, NULL) == -1) die("sigprocmask");
    int ends = signalfd(-1, &child_ends, SFD_CLOEXEC | SFD_NONBLOCK);
    if (ends == -1) die("signalfd");
    static char request[MAX_REQUEST];
    struct pollfd watch[2] = {{requests, POLLIN, 0}, {ends, POLLIN, 0}};
    for (;;) {
        if (poll(watch, 2, -1) == -1) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (watch[1].revents) {
            struct signalfd_siginfo info;
            while (read(ends, &info, sizeof info) == sizeof info) {
            }
            report_exits(events);
        }
        if (!watch[0].revents) continue;
        union {
            char buffer[CMSG_SPACE(2 * sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {request, sizeof request};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer,
                             .msg_controllen = sizeof control.buffer};
        ssize_t n = recvmsg(requests, &msg, MSG_CMSG_CLOEXEC);
        if (n == 0) return 0;
        if (n == -1) {
            if (errno == EINTR) continue;
            die("recvmsg");
        }
        int fds[2] = {-1, -1};
        size_t fd_count = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t here = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t k = 0; k < here && fd_count < 2; k++)
                    memcpy(&fds[fd_count++], CMSG_DATA(c) + k * sizeof(int), sizeof(int));
            }
        }
        int32_t reply;
        if (fd_count < 1 || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || request[n - 1] != '\0') {
            reply = -EINVAL;
        } else {
            /* Reply only once the child leads its own session, as Popen's
             * start_new_session does: a kill of its group sent at once must
             * not miss it. The child closes its end of this pipe then. */
            int ready[2];
            pid_t pid = -1;
            if (pipe2(ready, O_CLOEXEC) == 0) {
                pid = fork();
                if (pid == 0) {
                    close(ready[0]);
                    start_run(request, (size_t)n, fds[0], fd_count > 1 ? fds[1] : -1, ready[1]);
                }
                int failed = errno;
                close(ready[1]);
                char none;
                while (pid > 0 && read(ready[0], &none, 1) == -1 && errno == EINTR) {
                }
                close(ready[0]);
                errno = failed;
            }
            reply = pid == -1 ? -errno : pid;
        }
        for (size_t k = 0; k < fd_count; k++) close(fds[k]);
        if (send(requests, &reply, sizeof reply, MSG_NOSIGNAL) == -1) return 0;
    }
}

int main(int argc, char **argv) {
    if (argc == 2 && strncmp(argv[1], "--serve=", 8) == 0) return serve(argv[1] + 8);
    return launch(argc, argv);
}
