/*
 * child.h: the parent-death trampoline (see child.c).
 */
#ifndef SGLR_CHILD_H
#define SGLR_CHILD_H

/* argv[1] of `sglr --exec-child PARENT_PID SIGNAL FILE [ARGS...]` */
#define SGLR_CHILD_EXEC_ARG "--exec-child"

/* argv: PARENT_PID SIGNAL FILE [ARGS...]. Arms SIGNAL for the death of the
 * parent, then execs FILE; returns only on failure, with the exit status to
 * use (2 usage, 126 cannot run, 127 not found). */
int sglr_child_exec(int argc, char **argv);

#endif
