/*
 * livemig test guest workload: proves that a live migration kept every disk write and the
 * guest's running state.
 *
 * Every tick it writes one 512-byte record with O_DIRECT to each disk it was given, at sector
 * seq % nsectors of that disk, and only after the write returned acknowledges it on the
 * console. Each disk has its own seq (1, 2, 3, ...), advanced when a write succeeded: a failed
 * write is retried with the same seq next tick, so every disk holds a gapless ring. Between
 * ticks it dirties guest RAM at a given rate. It reads commands from the console: "poweroff"
 * stops the writes, syncs, prints "poweroff <last seq>" and powers the machine off.
 *
 * Record layout (little endian), checked by guest/_records.py:
 *   0  magic "LVMGREC1"      8 bytes
 *   8  seq                   u64, 1, 2, 3, ...
 *   16 boot id               u64, random per boot
 *   24 crc32                 u32, zlib CRC-32 of bytes 0..24 then 28..512
 *   28 zero padding          484 bytes
 *
 * Console output, one line each, with one disk:
 *   boot <16 hex digits>     once, before the first record
 *   workload <settings>      once, for the log
 *   heartbeat <seq>          after the record <seq> was written
 *   werror <seq> <message>   a write failed; the same seq is retried next tick
 *   dirtyrate <MiB/s>        every second while dirtying: the rate reached
 *   poweroff <last seq>      after the final sync, just before power off
 *
 * With several disks (vda, vdb, ... by the device's file name) the heartbeat and poweroff lines
 * carry every disk's last written seq, and <seq> is the first disk's:
 *   heartbeat <seq> vda=<seq> vdb=<seq>    after this tick's write to the first disk returned
 *   werror <seq> <disk>: <message>         that disk's write of <seq> failed
 *   poweroff <seq> vda=<seq> vdb=<seq>     after the final sync
 *
 * Usage: workload [-t tick_ms] [-r dirty_mib_s|max] [-b dirty_buf_mib] DEVICE...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512
#define PAGE 4096
#define RECORD_MAGIC "LVMGREC1"
#define DIRTY_SLICE_PAGES 64 /* pages dirtied between two looks at the clock */
#define RATE_MAX (-1L)
#define MAX_DISKS 16

struct options {
    long tick_ms;
    long dirty_mib_s; /* RATE_MAX: as fast as possible */
    long dirty_buf_mib;
    int ndisks;
    char **devices;
};

struct disk {
    const char *name; /* the device's file name: "vda" of /dev/vda */
    int fd;
    uint64_t nsectors;
    uint64_t seq;      /* the next seq to write */
    uint64_t last_seq; /* the last seq written (0: none yet) */
};

struct dirtier {
    unsigned char *buf;
    size_t npages;
    size_t next_page;
    uint64_t pass;
    double debt;         /* pages still to dirty at the current rate */
    uint64_t dirtied;    /* pages dirtied since the last rate report */
    int64_t reported_at; /* when the rate was last reported */
};

static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* Same contract as zlib's crc32(): feed the previous result to continue a checksum. */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Print one console line and flush it at once: the host reads the console live. */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void die(const char *what)
{
    say("workload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t make_boot_id(void)
{
    uint64_t id = 0;
    /* GRND_INSECURE: never wait for the entropy pool, which can take long under TCG. */
    if (getrandom(&id, sizeof id, 0x0004) != sizeof id)
        id = (uint64_t)now_ns() * 0x9e3779b97f4a7c15ull;
    return id ? id : 1;
}

static long parse_long(const char *s, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < 0) {
        say("workload: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

static struct options parse_options(int argc, char **argv)
{
    struct options o = {.tick_ms = 20, .dirty_mib_s = 0, .dirty_buf_mib = 64};
    int c;
    while ((c = getopt(argc, argv, "t:r:b:")) != -1) {
        switch (c) {
        case 't': o.tick_ms = parse_long(optarg, "tick_ms"); break;
        case 'r':
            o.dirty_mib_s = strcmp(optarg, "max") == 0 ? RATE_MAX : parse_long(optarg, "dirty_mib_s");
            break;
        case 'b': o.dirty_buf_mib = parse_long(optarg, "dirty_buf_mib"); break;
        default: say("usage: workload [-t ms] [-r mib_s|max] [-b mib] DEVICE...\n"); exit(2);
        }
    }
    if (optind >= argc || argc - optind > MAX_DISKS) {
        say("usage: workload [-t ms] [-r mib_s|max] [-b mib] DEVICE... (1 to %d)\n", MAX_DISKS);
        exit(2);
    }
    if (o.tick_ms < 1)
        o.tick_ms = 1;
    o.ndisks = argc - optind;
    o.devices = argv + optind;
    return o;
}

/* Dirty up to max_pages pages, one write per page, stopping early once the clock reaches
 * deadline. The value written changes every pass over the buffer so each write really changes
 * the page. Returns the number of pages dirtied. */
static size_t dirty_pages(struct dirtier *d, size_t max_pages, int64_t deadline)
{
    size_t done = 0;
    while (done < max_pages) {
        size_t slice = max_pages - done < DIRTY_SLICE_PAGES ? max_pages - done : DIRTY_SLICE_PAGES;
        for (size_t i = 0; i < slice; i++) {
            volatile uint64_t *word = (volatile uint64_t *)(d->buf + d->next_page * PAGE);
            *word = (d->pass << 32) | d->next_page;
            if (++d->next_page == d->npages) {
                d->next_page = 0;
                d->pass++;
            }
        }
        done += slice;
        d->dirtied += slice;
        if (now_ns() >= deadline)
            break;
    }
    return done;
}

static void quiet_console(void)
{
    struct termios t;
    if (tcgetattr(STDIN_FILENO, &t) == 0) {
        t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
        tcsetattr(STDIN_FILENO, TCSANOW, &t);
    }
}

/* Print "<word> <first disk's last seq>", with several disks followed by " <name>=<last seq>"
 * for each, as one line. */
static void say_acks(const char *word, const struct disk *disks, int ndisks)
{
    char line[64 + MAX_DISKS * 48];
    int n = snprintf(line, sizeof line, "%s %" PRIu64, word, disks[0].last_seq);
    for (int i = 0; ndisks > 1 && i < ndisks && n < (int)sizeof line; i++)
        n += snprintf(line + n, sizeof line - (size_t)n, " %s=%" PRIu64, disks[i].name,
                      disks[i].last_seq);
    say("%s\n", line);
}

static void power_off(const struct disk *disks, int ndisks)
{
    for (int i = 0; i < ndisks; i++)
        if (fsync(disks[i].fd) != 0)
            say("workload: fsync %s: %s\n", disks[i].name, strerror(errno));
    sync();
    say_acks("poweroff", disks, ndisks);
    tcdrain(STDOUT_FILENO);
    reboot(RB_POWER_OFF);
    die("reboot(RB_POWER_OFF)");
}

/* Read what the console has; return 1 when a "poweroff" line arrived. */
static int read_commands(char *line, size_t cap, size_t *len, int *stdin_open)
{
    char chunk[256];
    ssize_t n = read(STDIN_FILENO, chunk, sizeof chunk);
    if (n <= 0) {
        if (n == 0 || (errno != EINTR && errno != EAGAIN))
            *stdin_open = 0;
        return 0;
    }
    int poweroff = 0;
    for (ssize_t i = 0; i < n; i++) {
        char ch = chunk[i];
        if (ch == '\r' || ch == '\n') {
            line[*len] = '\0';
            if (strcmp(line, "poweroff") == 0)
                poweroff = 1;
            else if (*len)
                say("unknown command %s\n", line);
            *len = 0;
        } else if (*len + 1 < cap) {
            line[(*len)++] = ch;
        }
    }
    return poweroff;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct options o = parse_options(argc, argv);
    crc32_init();
    quiet_console();

    struct disk disks[MAX_DISKS] = {0};
    for (int i = 0; i < o.ndisks; i++) {
        struct disk *k = &disks[i];
        const char *slash = strrchr(o.devices[i], '/');
        k->name = slash ? slash + 1 : o.devices[i];
        k->fd = open(o.devices[i], O_RDWR | O_DIRECT);
        if (k->fd < 0)
            die(o.devices[i]);
        uint64_t size_bytes = 0;
        if (ioctl(k->fd, BLKGETSIZE64, &size_bytes) != 0)
            die("BLKGETSIZE64");
        k->nsectors = size_bytes / SECTOR;
        if (k->nsectors == 0) {
            say("workload: %s is empty\n", o.devices[i]);
            return 1;
        }
        k->seq = 1;
    }

    unsigned char *rec;
    if (posix_memalign((void **)&rec, PAGE, PAGE) != 0)
        die("posix_memalign");

    struct dirtier d = {0};
    d.npages = (size_t)o.dirty_buf_mib * (1024 * 1024 / PAGE);
    if (o.dirty_mib_s != 0 && d.npages) {
        d.buf = mmap(NULL, d.npages * PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (d.buf == MAP_FAILED)
            die("mmap dirty buffer");
    } else {
        d.npages = 0;
    }
    double pages_per_tick =
        o.dirty_mib_s > 0 ? (double)o.dirty_mib_s * (1024.0 * 1024 / PAGE) * o.tick_ms / 1000 : 0;

    uint64_t boot_id = make_boot_id();
    say("boot %016" PRIx64 "\n", boot_id);
    if (o.dirty_mib_s == RATE_MAX)
        say("workload nsectors=%" PRIu64 " tick_ms=%ld dirty_mib_s=max dirty_buf_mib=%ld\n",
            disks[0].nsectors, o.tick_ms, o.dirty_buf_mib);
    else
        say("workload nsectors=%" PRIu64 " tick_ms=%ld dirty_mib_s=%ld dirty_buf_mib=%ld\n",
            disks[0].nsectors, o.tick_ms, o.dirty_mib_s, o.dirty_buf_mib);
    for (int i = 0; o.ndisks > 1 && i < o.ndisks; i++)
        say("workload disk %s nsectors=%" PRIu64 "\n", disks[i].name, disks[i].nsectors);

    const int64_t tick_ns = (int64_t)o.tick_ms * 1000000;
    int64_t next_tick = now_ns();
    char line[128];
    size_t line_len = 0;
    int stdin_open = 1;

    for (;;) {
        int64_t t = now_ns();
        if (t >= next_tick) {
            int first_written = 0;
            for (int i = 0; i < o.ndisks; i++) {
                struct disk *k = &disks[i];
                memset(rec, 0, SECTOR);
                memcpy(rec, RECORD_MAGIC, 8);
                put_le64(rec + 8, k->seq);
                put_le64(rec + 16, boot_id);
                put_le32(rec + 24, crc32_update(crc32_update(0, rec, 24), rec + 28, SECTOR - 28));
                ssize_t w = pwrite(k->fd, rec, SECTOR, (off_t)((k->seq % k->nsectors) * SECTOR));
                const char *why = w < 0 ? strerror(errno) : "short write";
                if (w == SECTOR) {
                    k->last_seq = k->seq++;
                    first_written |= i == 0;
                } else if (o.ndisks == 1) {
                    say("werror %" PRIu64 " %s\n", k->seq, why);
                } else {
                    say("werror %" PRIu64 " %s: %s\n", k->seq, k->name, why);
                }
            }
            if (first_written)
                say_acks("heartbeat", disks, o.ndisks);
            next_tick += tick_ns;
            if (next_tick <= t) /* fell behind (e.g. the VM was paused): no burst of ticks */
                next_tick = t + tick_ns;
            d.debt += pages_per_tick;
            if (d.debt > (double)d.npages)
                d.debt = (double)d.npages;
        }

        if (d.npages && t - d.reported_at >= 1000000000) {
            if (d.reported_at)
                say("dirtyrate %.1f\n", (double)d.dirtied * PAGE / (1024 * 1024) /
                                             ((double)(t - d.reported_at) / 1e9));
            d.dirtied = 0;
            d.reported_at = t;
        }

        if (d.npages && o.dirty_mib_s == RATE_MAX)
            dirty_pages(&d, SIZE_MAX, next_tick);
        else if (d.debt >= 1)
            d.debt -= (double)dirty_pages(&d, (size_t)d.debt, next_tick);

        t = now_ns();
        int64_t wait = (o.dirty_mib_s == RATE_MAX || next_tick <= t) ? 0 : next_tick - t;
        struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        struct pollfd pfd = {.fd = stdin_open ? STDIN_FILENO : -1, .events = POLLIN};
        int ready = ppoll(&pfd, 1, &ts, NULL);
        if (ready > 0 && (pfd.revents & (POLLIN | POLLHUP | POLLERR)) &&
            read_commands(line, sizeof line, &line_len, &stdin_open))
            power_off(disks, o.ndisks);
    }
}
