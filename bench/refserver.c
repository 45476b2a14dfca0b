/*
 * refserver: the least a Unix-socket token service can cost on this machine,
 * the same-run reference for the daemon's socket figures (bench/socket_load.py).
 *
 * One thread, one epoll loop, as the daemon has: when the listener is readable
 * it accepts up to 64 connections, asks the kernel who the peer is
 * (SO_PEERCRED, as the daemon does for every connection), reads the request
 * line if it is already there (MSG_DONTWAIT, as the daemon's quick path does)
 * and writes a canned answer, then closes. A connection whose line is not there
 * yet waits on the same epoll loop for it. Nothing is parsed and nothing looked
 * up: the answer is the bytes of ANSWER_FILE, a real answer of the daemon to the
 * same request, so that both write the same number of bytes and the load
 * generator's checks (a token, expires_at far enough away) hold for both.
 *
 * It stops by itself: on SIGTERM or SIGINT, or after MAX_SECONDS at the latest,
 * removing its socket file.
 *
 * usage: refserver SOCKET ANSWER_FILE MAX_SECONDS
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define ACCEPT_BATCH 64
#define LINE_MAX_BYTES 65536

static volatile sig_atomic_t stopping;
static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static char *answer;
static size_t answer_len;
static unsigned long long served, waited;

/* Write the answer and close; a peer gone early is its own loss. */
static void answer_and_close(int fd) {
    size_t sent = 0;
    while (sent < answer_len) {
        ssize_t n = send(fd, answer + sent, answer_len - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0) break; /* a full socket buffer cannot happen for a few hundred bytes */
        sent += (size_t)n;
    }
    close(fd);
    served++;
}

/* Read what is there; returns 1 when the line is complete (or the peer is gone). */
static int line_here(int fd) {
    char buf[LINE_MAX_BYTES];
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (n <= 0) return -1;
    return memchr(buf, '\n', (size_t)n) != NULL ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET ANSWER_FILE MAX_SECONDS\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    double max_seconds = atof(argv[3]);
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    answer = malloc(LINE_MAX_BYTES);
    answer_len = fread(answer, 1, LINE_MAX_BYTES, f);
    fclose(f);
    if (answer_len == 0 || max_seconds <= 0) {
        fprintf(stderr, "refserver: empty answer or bad MAX_SECONDS\n");
        return 2;
    }

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "refserver: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, path);
    unlink(path);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(listener, 4096) < 0) {
        perror("refserver: listen");
        return 1;
    }
    chmod(path, 0600);

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);

    /* Ready: the bench waits for this line on stdout. */
    printf("ready\n");
    fflush(stdout);

    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    struct epoll_event events[256];
    while (!stopping) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 > max_seconds)
            break;
        int n = epoll_wait(epfd, events, 256, 100);
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd != listener) {
                /* A connection whose line had not come when it was accepted. */
                int here = line_here(fd);
                if (here == 0) continue;
                epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
                if (here > 0)
                    answer_and_close(fd);
                else
                    close(fd);
                continue;
            }
            for (int i = 0; i < ACCEPT_BATCH; i++) {
                int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                if (conn < 0) break;
                struct ucred cred;
                socklen_t len = sizeof cred;
                if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
                    close(conn);
                    continue;
                }
                int here = line_here(conn);
                if (here > 0) {
                    answer_and_close(conn);
                } else if (here < 0) {
                    close(conn);
                } else {
                    waited++;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = conn};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, conn, &cev);
                }
            }
        }
    }
    unlink(path);
    fprintf(stderr, "refserver: served %llu, %llu waited for their line\n", served, waited);
    return 0;
}
