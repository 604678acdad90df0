/* bench/loadgen.c: the benchmark's load generator, compiled by bench/run.py.
 *
 * C so that the clients are never the bottleneck: blocking sockets, one process per
 * connection, a few microseconds of CPU per request. Speaks the two TCP forms of
 * docs/protocol.md and UDP. Prints one JSON line: operations, seconds, errors, p50/p99.
 *
 *   loadgen oneshot HOST PORT CONNS SECONDS PAYLOAD      connect, write, half-close, read
 *   loadgen nohalfclose HOST PORT CONNS SECONDS PAYLOAD  connect, write, read until closed
 *                                                        (the original's PHP clients)
 *   loadgen framed  HOST PORT CONNS SECONDS PAYLOAD DEPTH  kept connection, DEPTH in flight
 *   loadgen queue   HOST PORT CONNS SECONDS              framed queue:add:echo + queue:get
 *   loadgen udp     HOST PORT RATE  SECONDS PAYLOAD      datagrams at RATE per second
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 2000000
static const char PREFACE[4] = {0, ':', 'F', '1'};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in target;

static int connect_tcp(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* A server that never answers (or never closes) costs an error, not a hung run. */
    struct timeval limit = {10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t n) {
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w <= 0) return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_exact(int fd, char *buf, size_t n) {
    while (n) {
        ssize_t r = read(fd, buf, n);
        if (r <= 0) return -1;
        buf += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One framed reply: its status, its body in body (at most cap bytes kept). */
static int read_reply(int fd, char *body, size_t cap, uint32_t *len) {
    char head[7];
    if (read_exact(fd, head, 7) < 0) return -1;
    uint32_t n;
    memcpy(&n, head + 3, 4);
    n = ntohl(n);
    *len = n;
    char sink[4096];
    size_t kept = 0;
    while (n) {
        size_t chunk = n > sizeof sink ? sizeof sink : n;
        if (read_exact(fd, sink, chunk) < 0) return -1;
        if (kept < cap) {
            size_t c = chunk < cap - kept ? chunk : cap - kept;
            memcpy(body + kept, sink, c);
            kept += c;
        }
        n -= (uint32_t)chunk;
    }
    return (head[0] - '0') * 100 + (head[1] - '0') * 10 + (head[2] - '0');
}

static void frame(char *out, const char *payload, uint32_t n) {
    uint32_t be = htonl(n);
    memcpy(out, &be, 4);
    memcpy(out + 4, payload, n);
}

static int framed_open(void) {
    int fd = connect_tcp();
    if (fd < 0) return -1;
    char back[4];
    if (write_all(fd, PREFACE, 4) < 0 || read_exact(fd, back, 4) < 0 || memcmp(back, PREFACE, 4)) {
        close(fd);
        return -1;
    }
    return fd;
}

struct result {
    long ops, errors, samples;
    uint32_t lat[MAX_SAMPLES / 4];
};

static void record(struct result *r, double started) {
    if (r->samples < (long)(sizeof r->lat / sizeof r->lat[0]))
        r->lat[r->samples++] = (uint32_t)((now() - started) * 1e6);
    r->ops++;
}

/* A connection per request. half_close: shut the write side after the request (the end of
 * the request is then certain); without it the server must tell the end on its own, as
 * for the original's PHP clients (fsockopen, one fputs, read). */
static void run_oneshot(struct result *r, double end, const char *payload, int half_close) {
    size_t n = strlen(payload);
    char buf[65536];
    while (now() < end) {
        double t = now();
        int fd = connect_tcp();
        if (fd < 0) { r->errors++; continue; }
        int ok = write_all(fd, payload, n) == 0;
        if (half_close) shutdown(fd, SHUT_WR);
        ssize_t got, total = 0;
        while ((got = read(fd, buf, sizeof buf)) > 0) total += got;
        close(fd);
        if (ok && total > 0 && !(buf[0] >= '4' && buf[0] <= '5' && total > 3 && buf[3] == ':'))
            record(r, t);
        else
            r->errors++;
    }
}

static void run_framed(struct result *r, double end, const char *payload, int depth) {
    int fd = framed_open();
    if (fd < 0) { r->errors++; return; }
    uint32_t n = (uint32_t)strlen(payload);
    char *batch = malloc((size_t)depth * (n + 4));
    for (int i = 0; i < depth; i++) frame(batch + (size_t)i * (n + 4), payload, n);
    char body[64];
    uint32_t len;
    while (now() < end) {
        double t = now();
        if (write_all(fd, batch, (size_t)depth * (n + 4)) < 0) { r->errors++; break; }
        for (int i = 0; i < depth; i++) {
            if (read_reply(fd, body, sizeof body, &len) == 200) record(r, t);
            else r->errors++;
        }
    }
    free(batch);
    close(fd);
}

static void run_queue(struct result *r, double end) {
    int fd = framed_open();
    if (fd < 0) { r->errors++; return; }
    char out[128], body[64];
    uint32_t len;
    while (now() < end) {
        double t = now();
        const char *add = "queue:add:echo:x";
        frame(out, add, (uint32_t)strlen(add));
        if (write_all(fd, out, strlen(add) + 4) < 0) { r->errors++; break; }
        if (read_reply(fd, body, sizeof body - 1, &len) != 200) { r->errors++; continue; }
        body[len < sizeof body - 1 ? len : sizeof body - 1] = 0;
        char get[64];
        int g = snprintf(get, sizeof get, "queue:get:%s", body);
        frame(out, get, (uint32_t)g);
        if (write_all(fd, out, (size_t)g + 4) < 0) { r->errors++; break; }
        if (read_reply(fd, body, sizeof body, &len) == 200) record(r, t);
        else r->errors++;
    }
    close(fd);
}

static void run_udp(struct result *r, double end, const char *payload, long rate) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    size_t n = strlen(payload);
    double start = now();
    while (1) {
        double t = now();
        if (t >= end) break;
        long due = (long)((t - start) * rate);
        while (r->ops < due) {
            if (sendto(fd, payload, n, 0, (struct sockaddr *)&target, sizeof target) < 0)
                r->errors++;
            r->ops++;
        }
        usleep(200);
    }
    close(fd);
}

static int cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: loadgen MODE HOST PORT CONNS|RATE SECONDS [PAYLOAD [DEPTH]]\n");
        return 2;
    }
    const char *mode = argv[1];
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    inet_pton(AF_INET, argv[2], &target.sin_addr);
    long conns = atol(argv[4]);
    double seconds = atof(argv[5]);
    const char *payload = argc > 6 ? argv[6] : "test:x";
    int depth = argc > 7 ? atoi(argv[7]) : 1;
    int udp = strcmp(mode, "udp") == 0;
    int workers = udp ? 1 : (int)conns;
    double end = now() + seconds;
    char path[64];
    pid_t pids[256];
    for (int w = 0; w < workers && w < 256; w++) {
        pids[w] = fork();
        if (pids[w] == 0) {
            struct result *r = calloc(1, sizeof *r);
            if (!strcmp(mode, "oneshot")) run_oneshot(r, end, payload, 1);
            else if (!strcmp(mode, "nohalfclose")) run_oneshot(r, end, payload, 0);
            else if (!strcmp(mode, "framed")) run_framed(r, end, payload, depth);
            else if (!strcmp(mode, "queue")) run_queue(r, end);
            else if (udp) run_udp(r, end, payload, conns);
            snprintf(path, sizeof path, "/tmp/loadgen.%d.%d", getppid(), w);
            FILE *f = fopen(path, "wb");
            fwrite(r, sizeof(long), 3, f);
            fwrite(r->lat, sizeof(uint32_t), (size_t)r->samples, f);
            fclose(f);
            _exit(0);
        }
    }
    for (int w = 0; w < workers; w++) waitpid(pids[w], NULL, 0);
    double took = seconds;
    long ops = 0, errors = 0, samples = 0;
    uint32_t *all = malloc(sizeof(uint32_t) * MAX_SAMPLES);
    for (int w = 0; w < workers; w++) {
        snprintf(path, sizeof path, "/tmp/loadgen.%d.%d", getpid(), w);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        long head[3];
        if (fread(head, sizeof(long), 3, f) == 3) {
            ops += head[0];
            errors += head[1];
            long room = MAX_SAMPLES - samples;
            long take = head[2] < room ? head[2] : room;
            samples += (long)fread(all + samples, sizeof(uint32_t), (size_t)take, f);
        }
        fclose(f);
        unlink(path);
    }
    qsort(all, (size_t)samples, sizeof(uint32_t), cmp);
    double p50 = samples ? all[samples / 2] : 0, p99 = samples ? all[(samples * 99) / 100] : 0;
    printf("{\"ops\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"p50_us\": %.0f, \"p99_us\": %.0f}\n",
           ops, errors, took, p50, p99);
    return 0;
}
