/*
 * esvm Linux userland workload: a static C program whose printed digest must be the same
 * when it runs inside an esvm guest and natively on the host (the differential oracle for
 * the software vCPU under a real kernel and libc).
 *
 * Each section folds its results into one FNV-1a digest and prints "section=<hex>"; the
 * last line is "workload digest=<hex>". Sections: integer arithmetic, strings and qsort,
 * double-precision libm, x87 long double, files on the root file system, fork + pipe.
 *
 * Usage: workload [scale]   (default 1; the work grows linearly)
 *
 * glibc picks FMA/AVX variants of libm on hosts that have them; run the native oracle with
 * GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-FMA4,-AVX512F so both sides use the
 * SSE2 code the guest's CPUID selects.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define FNV0 0xcbf29ce484222325ULL
#define FOLD(h, v)                      \
    do {                                \
        __typeof__(v) fold_v_ = (v);    \
        h = fnv(h, &fold_v_, sizeof fold_v_); \
    } while (0)

static void die(const char *what) {
    printf("workload: %s failed: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(2);
}

static uint64_t integers(int scale) {
    uint64_t h = FNV0, x = 0x9e3779b97f4a7c15ULL;
    for (long i = 0; i < 200000L * scale; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t q = x / ((i & 0xffff) + 1), r = x % 1000003;
        int64_t s = (int64_t)x >> (i & 63);
        unsigned __int128 m = (unsigned __int128)x * (q | 1);
        h ^= q + r + (uint64_t)s + (uint64_t)(m >> 64) + __builtin_popcountll(x) +
             __builtin_ctzll(x | 1) + __builtin_clzll(x | 1);
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static uint64_t strings(int scale) {
    uint64_t h = FNV0;
    enum { N = 2000 };
    static char buf[N][48];
    static char *ptr[N];
    for (int round = 0; round < 2 * scale; round++) {
        for (int i = 0; i < N; i++) {
            snprintf(buf[i], sizeof buf[i], "%08x-%d-%s", (unsigned)(i * 2654435761u + round),
                     i % 97, (i & 1) ? "odd" : "even");
            ptr[i] = buf[i];
        }
        qsort(ptr, N, sizeof ptr[0], cmp_str);
        for (int i = 0; i < N; i += 7) {
            h = fnv(h, ptr[i], strlen(ptr[i]));
            char *dash = strchr(ptr[i], '-');
            FOLD(h, (long)(dash ? dash - ptr[i] : -1));
            FOLD(h, strtol(dash ? dash + 1 : "0", NULL, 10));
        }
    }
    return h;
}

static uint64_t doubles(int scale) {
    uint64_t h = FNV0;
    double acc = 0;
    for (int i = 1; i <= 20000 * scale; i++) {
        double x = i * 0.001;
        double v = sin(x) * cos(x / 3) + exp(-x / 50) + log(x + 1) + sqrt(x) + atan2(x, 7.0) +
                   pow(x, 0.3) + fmod(x * 13.7, 3.1);
        acc += v;
        if (i % 997 == 0)
            FOLD(h, acc);
    }
    char s[64];
    snprintf(s, sizeof s, "%.17g", acc);
    h = fnv(h, s, strlen(s));
    FOLD(h, acc);
    return h;
}

static uint64_t long_doubles(int scale) {
    uint64_t h = FNV0;
    long double acc = 0, p = 1;
    for (int i = 1; i <= 5000 * scale; i++) {
        long double x = i / 7.0L;
        acc += sqrtl(x) / (x + 1.0L) - x * 1e-4L;
        p = p * 1.0001L + 1 / x;
        if (i % 499 == 0) {
            /* The 80-bit value, not the padding bytes. */
            h = fnv(h, &acc, 10);
            h = fnv(h, &p, 10);
            long long r = llrintl(acc * 1e6L);
            FOLD(h, r);
        }
    }
    char s[80];
    snprintf(s, sizeof s, "%.21Lg %.21Lg", acc, p);
    h = fnv(h, s, strlen(s));
    return h;
}

static uint64_t files(int scale) {
    uint64_t h = FNV0;
    /* Per process: native oracle runs may go on side by side. */
    char path[64];
    snprintf(path, sizeof path, "/tmp/esvm-workload.%ld.dat", (long)getpid());
    static unsigned char block[8192];
    for (int round = 0; round < 4 * scale; round++) {
        int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0600);
        if (fd < 0)
            die("open");
        for (int k = 0; k < 16; k++) {
            for (size_t i = 0; i < sizeof block; i++)
                block[i] = (unsigned char)(i * 31 + k * 7 + round);
            if (write(fd, block, sizeof block) != (ssize_t)sizeof block)
                die("write");
        }
        if (lseek(fd, 4096 * 3 + 17, SEEK_SET) < 0)
            die("lseek");
        ssize_t n = read(fd, block, 5000);
        if (n != 5000)
            die("read");
        h = fnv(h, block, (size_t)n);
        close(fd);
        if (unlink(path) != 0)
            die("unlink");
    }
    return h;
}

static uint64_t processes(int scale) {
    uint64_t h = FNV0;
    for (int round = 0; round < 3 * scale; round++) {
        int fds[2];
        if (pipe(fds) != 0)
            die("pipe");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(fds[0]);
            char msg[256];
            for (int i = 0; i < 64; i++) {
                int len = snprintf(msg, sizeof msg, "child %d line %d value %lu\n", round, i,
                                   (unsigned long)i * i * 2654435761u);
                if (write(fds[1], msg, (size_t)len) != len)
                    _exit(3);
            }
            _exit(round & 0x7f);
        }
        close(fds[1]);
        char buf[4096];
        ssize_t n;
        while ((n = read(fds[0], buf, sizeof buf)) > 0)
            h = fnv(h, buf, (size_t)n);
        close(fds[0]);
        int status = 0;
        if (waitpid(pid, &status, 0) != pid)
            die("waitpid");
        FOLD(h, (int)WEXITSTATUS(status));
    }
    return h;
}

int main(int argc, char **argv) {
    int scale = argc > 1 ? atoi(argv[1]) : 1;
    if (scale < 1)
        scale = 1;
    struct {
        const char *name;
        uint64_t (*f)(int);
    } sections[] = {
        {"integer", integers}, {"string", strings},  {"double", doubles},
        {"x87", long_doubles}, {"files", files},     {"process", processes},
    };
    uint64_t all = FNV0;
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++) {
        uint64_t v = sections[i].f(scale);
        printf("%s=%016llx\n", sections[i].name, (unsigned long long)v);
        FOLD(all, v);
    }
    printf("workload digest=%016llx\n", (unsigned long long)all);
    fflush(stdout);
    return 0;
}
