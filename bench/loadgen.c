/*
 * loadgen: a load generator for mailoauthd's Unix socket, built by bench/run.py.
 *
 * Each simulated client does what `mailoauth token ACCOUNT` does: connect,
 * send one request line, read the answer until the daemon closes, close. All
 * clients run as state machines on one epoll loop in one thread, so the
 * generator costs a fraction of a core and the daemon (one Python thread) is
 * what is measured. bench/run.py reports the generator's own CPU time next to
 * the daemon's to show which of the two was the bottleneck.
 *
 * Two modes:
 *   closed (--rate 0): every client sends its next request as soon as it has
 *       the previous answer; measures the most the daemon can serve.
 *   open (--rate R): requests are due at a fixed total rate R, each client
 *       taking every CLIENTS-th slot; latency is measured from the moment a
 *       request was due, not from when it was sent, so a stalled daemon shows
 *       up in the latencies (no coordinated omission).
 *
 * Every answer is checked: it must be {"ok":true,...} with a token, and its
 * expires_at must be at least MIN_VALIDITY seconds after the moment the answer
 * arrived (wall clock), to the second (expires_at is in whole seconds). The
 * counts go to the JSON summary on stdout.
 *
 * usage: loadgen SOCKET CLIENTS SECONDS RATE MIN_VALIDITY ACCOUNT...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum phase { IDLE, CONNECTING, SENDING, RECEIVING };

struct client {
    int fd;
    enum phase phase;
    int64_t started_ns; /* when the request was due (open) or sent (closed) */
    size_t sent;
    size_t request_len;
    const char *request;
    size_t received;
    char reply[4096];
    uint64_t slot; /* open mode: the index of this client's next slot */
};

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static struct sockaddr_un addr;
static int epfd;
static int64_t t0;
/* The worst latency among requests due in each second of the run. */
#define MAX_SECONDS 3600
static int64_t worst_by_second[MAX_SECONDS];
static int64_t *latencies;
static size_t n_lat, cap_lat;
static uint64_t n_ok, n_errors, n_violations, n_connect_retries;
static double min_margin = 1e18;
static double min_validity;
static char first_error[256];

static void record(int64_t ns) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 1 << 16;
        latencies = realloc(latencies, cap_lat * sizeof *latencies);
        if (!latencies) {
            perror("realloc");
            exit(1);
        }
    }
    latencies[n_lat++] = ns;
}

static void check_reply(struct client *c) {
    c->reply[c->received < sizeof c->reply ? c->received : sizeof c->reply - 1] = 0;
    const char *r = c->reply;
    if (!strstr(r, "\"ok\":true") && !strstr(r, "\"ok\": true")) {
        n_errors++;
        if (!first_error[0]) {
            snprintf(first_error, sizeof first_error, "%.200s", r);
            char *nl = strchr(first_error, '\n');
            if (nl) *nl = 0;
        }
        return;
    }
    const char *tok = strstr(r, "\"token\":");
    const char *exp = strstr(r, "\"expires_at\":");
    if (!tok || !exp) {
        n_errors++;
        if (!first_error[0]) snprintf(first_error, sizeof first_error, "no token or expires_at");
        return;
    }
    /* expires_at is in whole seconds, rounded down: the token expires within
     * [expires_at, expires_at + 1). A violation is a token that certainly has
     * less than MIN_VALIDITY left when its answer arrives. */
    double margin = strtod(exp + strlen("\"expires_at\":"), NULL) - wall_s();
    if (margin < min_margin) min_margin = margin;
    if (margin + 1.0 < min_validity) n_violations++;
    n_ok++;
}

static void start(struct client *c) {
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        perror("socket");
        exit(1);
    }
    c->sent = c->received = 0;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
        c->phase = SENDING;
    } else if (errno == EAGAIN || errno == EINPROGRESS) {
        /* The listen backlog is full: wait until the daemon accepts. */
        c->phase = CONNECTING;
        n_connect_retries++;
    } else {
        perror("connect");
        exit(1);
    }
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void finish(struct client *c, int64_t now) {
    record(now - c->started_ns);
    int64_t second = (c->started_ns - t0) / 1000000000;
    if (second >= 0 && second < MAX_SECONDS && now - c->started_ns > worst_by_second[second])
        worst_by_second[second] = now - c->started_ns;
    check_reply(c);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->phase = IDLE;
}

/* Advance a client as far as it goes without blocking; returns 1 when its request is done. */
static int step(struct client *c) {
    if (c->phase == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err == EAGAIN) return 0;
        if (err) {
            fprintf(stderr, "connect: %s\n", strerror(err));
            exit(1);
        }
        c->phase = SENDING;
    }
    if (c->phase == SENDING) {
        while (c->sent < c->request_len) {
            ssize_t n = send(c->fd, c->request + c->sent, c->request_len - c->sent, MSG_NOSIGNAL);
            if (n < 0 && errno == EAGAIN) return 0;
            if (n < 0) {
                /* Reset before our line was read: the answer may still be waiting. */
                break;
            }
            c->sent += (size_t)n;
        }
        c->phase = RECEIVING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    for (;;) {
        char *buf = c->reply + c->received;
        size_t room = sizeof c->reply - 1 - c->received;
        char sink[4096];
        if (room == 0) {
            buf = sink;
            room = sizeof sink;
        }
        ssize_t n = recv(c->fd, buf, room, 0);
        if (n > 0) {
            if (buf != sink) c->received += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EAGAIN) return 0;
        return 1; /* EOF (or a reset): the daemon is done with us */
    }
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s SOCKET CLIENTS SECONDS RATE MIN_VALIDITY ACCOUNT...\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int n_clients = atoi(argv[2]);
    double seconds = atof(argv[3]);
    double rate = atof(argv[4]);
    min_validity = atof(argv[5]);
    int n_accounts = argc - 6;
    if (n_clients < 1 || seconds <= 0 || rate < 0 || strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path);

    /* The helper's exact request line (protocol.encode_token_request). */
    char **requests = calloc((size_t)n_accounts, sizeof *requests);
    size_t *request_lens = calloc((size_t)n_accounts, sizeof *request_lens);
    for (int i = 0; i < n_accounts; i++) {
        int n = asprintf(&requests[i],
                         "{\"v\":1,\"op\":\"token\",\"account\":\"%s\","
                         "\"min_validity\":-1.0,\"timeout\":15.0}\n",
                         argv[6 + i]);
        if (n < 0) return 1;
        request_lens[i] = (size_t)n;
    }

    struct client *clients = calloc((size_t)n_clients, sizeof *clients);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event events[256];
    t0 = mono_ns();
    int64_t end = t0 + (int64_t)(seconds * 1e9);
    int64_t period = rate > 0 ? (int64_t)(1e9 * n_clients / rate) : 0;
    uint64_t issued = 0;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);

    for (int i = 0; i < n_clients; i++) {
        clients[i].fd = -1;
        clients[i].phase = IDLE;
        clients[i].slot = 0;
    }
    for (;;) {
        int64_t now = mono_ns();
        int64_t next_due = INT64_MAX;
        int busy = 0, done_at_once = 0;
        for (int i = 0; i < n_clients; i++) {
            struct client *c = &clients[i];
            if (c->phase != IDLE) {
                busy++;
                continue;
            }
            int64_t due = now;
            if (period) {
                /* Client i owns slots i, i+N, i+2N, ... spread evenly over the period. */
                due = t0 + (int64_t)c->slot * period + (int64_t)i * period / n_clients;
                if (due > now) {
                    if (due < next_due) next_due = due;
                    continue;
                }
            }
            if (now >= end) continue;
            int a = (int)(issued++ % (uint64_t)n_accounts);
            c->request = requests[a];
            c->request_len = request_lens[a];
            c->started_ns = period ? due : now;
            c->slot++;
            start(c);
            if (step(c)) {
                /* Answered before we waited at all (a fast server): the client is
                 * idle again, and must not wait for an event that will not come. */
                finish(c, mono_ns());
                done_at_once++;
            } else {
                busy++;
            }
        }
        if (!busy && now >= end) break;
        /* Wake exactly when the next request is due: epoll_pwait2 takes nanoseconds. */
        int64_t wait = 100000000;
        if (period && next_due != INT64_MAX) {
            wait = next_due - mono_ns();
            if (wait < 0) wait = 0;
            if (wait > 100000000) wait = 100000000;
        } else if (!busy || (done_at_once && !period)) {
            wait = 0;
        }
        struct timespec timeout = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        int n = epoll_pwait2(epfd, events, 256, &timeout, NULL);
        int64_t after = mono_ns();
        for (int k = 0; k < n; k++) {
            struct client *c = events[k].data.ptr;
            if (step(c)) finish(c, after);
        }
    }
    int64_t elapsed = mono_ns() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    qsort(latencies, n_lat, sizeof *latencies, cmp_i64);
#define PCT(p) (n_lat ? latencies[(size_t)fmin((double)n_lat - 1, floor((p) * (double)n_lat))] / 1e3 : 0.0)
    printf("{\"requests\":%zu,\"ok\":%llu,\"errors\":%llu,\"violations\":%llu,"
           "\"seconds\":%.6f,\"rate\":%.1f,"
           "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,"
           "\"min_margin_s\":%.3f,\"cpu_s\":%.6f,\"connect_retries\":%llu,\"first_error\":\"",
           n_lat, (unsigned long long)n_ok, (unsigned long long)n_errors,
           (unsigned long long)n_violations, elapsed / 1e9, n_lat / (elapsed / 1e9), PCT(0.50),
           PCT(0.90), PCT(0.99), PCT(0.999), n_lat ? latencies[n_lat - 1] / 1e3 : 0.0,
           n_ok ? min_margin : 0.0, cpu, (unsigned long long)n_connect_retries);
    for (const char *p = first_error; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        if ((unsigned char)*p >= 0x20) putchar(*p);
    }
    printf("\",\"max_us_by_second\":[");
    int seconds_run = (int)fmin(MAX_SECONDS, ceil(seconds - 1e-9));
    for (int i = 0; i < seconds_run; i++) printf("%s%.1f", i ? "," : "", worst_by_second[i] / 1e3);
    printf("]}\n");
    return 0;
}
