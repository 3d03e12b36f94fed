/*
 * test_child.c: the parent-death trampoline (core/child.c). The test
 * process makes itself a child subreaper, so a grandchild whose parent
 * dies is reparented to it and its fate can be read with waitpid.
 */
#include "test.h"
#include "child.h"

#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* waitpid with a deadline: the status, or -1 when pid is still running. */
static int wait_status(pid_t pid, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return st;
        if (r < 0)
            return -1;
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    return -1;
}

/* fork; the child runs the trampoline with these arguments */
static pid_t trampoline(long ppid, int sig, char *const cmd[])
{
    pid_t pid = fork();
    if (pid == 0) {
        char pbuf[32], sbuf[32];
        char *argv[16];
        int n = 0;
        snprintf(pbuf, sizeof pbuf, "%ld", ppid);
        snprintf(sbuf, sizeof sbuf, "%d", sig);
        argv[n++] = pbuf;
        argv[n++] = sbuf;
        for (int i = 0; cmd[i] && n < 15; i++)
            argv[n++] = cmd[i];
        argv[n] = NULL;
        _exit(sglr_child_exec(n, argv));
    }
    return pid;
}

TEST(runs_the_command)
{
    char *cmd[] = { "/bin/sh", "-c", "exit 7", NULL };
    pid_t pid = trampoline(getpid(), SIGKILL, cmd);
    int st = wait_status(pid, 5000);
    CHECK(st != -1 && WIFEXITED(st));
    CHECK_EQ_INT(WEXITSTATUS(st), 7);
}

TEST(missing_command_exits_127)
{
    char *cmd[] = { "/nonexistent/sglr-test-command", NULL };
    pid_t pid = trampoline(getpid(), SIGKILL, cmd);
    int st = wait_status(pid, 5000);
    CHECK(st != -1 && WIFEXITED(st));
    CHECK_EQ_INT(WEXITSTATUS(st), 127);
}

TEST(bad_arguments_exit_2)
{
    char *argv[] = { "notapid", "9", "/bin/true", NULL };
    pid_t pid = fork();
    if (pid == 0)
        _exit(sglr_child_exec(3, argv));
    int st = wait_status(pid, 5000);
    CHECK(st != -1 && WIFEXITED(st));
    CHECK_EQ_INT(WEXITSTATUS(st), 2);
}

/* The parent named is not the real one (it died before the trampoline
 * armed the signal): the command never runs, the signal is taken at once. */
TEST(parent_already_gone)
{
    char *cmd[] = { "/bin/sh", "-c", "exit 7", NULL };
    pid_t pid = trampoline(getpid() + 100000, SIGTERM, cmd);
    int st = wait_status(pid, 5000);
    CHECK(st != -1 && WIFSIGNALED(st));
    CHECK_EQ_INT(WTERMSIG(st), SIGTERM);
}

/* A middle process starts `sleep 30` through the trampoline, waits until
 * the exec happened, and exits: the sleep must get its signal. */
TEST(dies_with_its_parent)
{
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t middle = fork();
    if (middle == 0) {
        close(fds[0]);
        char *cmd[] = { "sleep", "30", NULL };
        pid_t pid = trampoline(getpid(), SIGKILL, cmd);
        char path[64], comm[64] = "";
        snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
        for (int i = 0; i < 500; i++) {
            FILE *f = fopen(path, "r");
            if (f) {
                if (!fgets(comm, sizeof comm, f))
                    comm[0] = 0;
                fclose(f);
            }
            if (strcmp(comm, "sleep\n") == 0)
                break;
            struct timespec ts = { 0, 10 * 1000 * 1000 };
            nanosleep(&ts, NULL);
        }
        if (write(fds[1], &pid, sizeof pid) != sizeof pid)
            _exit(1);
        _exit(strcmp(comm, "sleep\n") == 0 ? 0 : 1);
    }
    close(fds[1]);
    pid_t sleeper = 0;
    CHECK(read(fds[0], &sleeper, sizeof sleeper) == sizeof sleeper);
    close(fds[0]);
    int st = wait_status(middle, 5000);
    CHECK(st != -1 && WIFEXITED(st));
    CHECK_EQ_INT(WEXITSTATUS(st), 0);        /* the sleep had started */
    st = wait_status(sleeper, 5000);
    if (st == -1)
        kill(sleeper, SIGKILL);
    CHECK(st != -1 && WIFSIGNALED(st));
    CHECK_EQ_INT(WTERMSIG(st), SIGKILL);
}

int main(void)
{
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) {
        perror("prctl(PR_SET_CHILD_SUBREAPER)");
        return 1;
    }
    RUN(runs_the_command);
    RUN(missing_command_exits_127);
    RUN(bad_arguments_exit_2);
    RUN(parent_already_gone);
    RUN(dies_with_its_parent);
    TEST_EXIT();
}
