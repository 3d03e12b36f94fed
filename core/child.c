/*
 * child.c: run a command as a child that dies with its parent.
 *
 * libuv's uv_spawn forks and execs with no hook in between, so a child
 * cannot ask the kernel for a parent-death signal (prctl PR_SET_PDEATHSIG)
 * before the command starts. sglr execs itself instead, as a trampoline:
 *
 *     parent (pid P) --uv_spawn--> sglr --exec-child P SIG FILE ARGS...
 *                                    | prctl(PR_SET_PDEATHSIG, SIG)
 *                                    | getppid() == P ?  (else P is gone)
 *                                    `--execvp--> FILE ARGS...
 *
 * The signal survives execve (it is only cleared for set-user-ID
 * programs), so FILE gets SIG when the parent's thread that spawned it
 * ends, however it ends: a SIGKILLed `sglr launch` leaves no workers. The
 * pid the parent holds stays the command's pid, and the process handle,
 * exit status and pipes work as with a plain uv_spawn. sglr.proc builds the
 * argument vector; main.c hands it here before any runtime state exists,
 * so the command inherits no signal disposition of ours.
 */
#include "child.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

static int parse_int(const char *s, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

int sglr_child_exec(int argc, char **argv)
{
    long ppid, sig;
    if (argc < 3 || parse_int(argv[0], &ppid) < 0 || parse_int(argv[1], &sig) < 0 ||
        sig <= 0 || sig >= NSIG) {
        fprintf(stderr, "usage: sglr " SGLR_CHILD_EXEC_ARG " PARENT_PID SIGNAL FILE [ARGS...]\n");
        return 2;
    }
    if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) < 0) {
        fprintf(stderr, "sglr: prctl(PR_SET_PDEATHSIG): %s\n", strerror(errno));
        return 126;
    }
    /* The parent may have died between fork and prctl: then nobody would
     * ever send the signal, so behave as if it had been sent. */
    if ((long)getppid() != ppid) {
        signal((int)sig, SIG_DFL);
        raise((int)sig);
        return 126;
    }
    execvp(argv[2], argv + 2);
    fprintf(stderr, "sglr: cannot run %s: %s\n", argv[2], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
