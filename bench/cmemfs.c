/* cmemfs: the baseline of the fio matrix (bench/fio_bench.py).
 *
 * A FUSE file server on plain libfuse 3 (the low-level API) that exports one
 * regular file backed by memory and does nothing per request but memcpy:
 * no protocol, no device, no queue.  It is what a FUSE daemon costs at the
 * least on this kernel, so nvmefs's figures are read as ratios against it.
 *
 * Negotiated like the nvmefs mount, so the two see the same requests:
 * direct_io on open (the kernel neither caches nor splits beyond
 * max_write), max_write 1 MiB (libfuse derives max_pages from it, so reads
 * are 1 MiB too), max_background 64 (libaio at QD32 is otherwise held to the
 * kernel's default of 12 background requests), no splice.
 *
 *   cmemfs MOUNTPOINT SIZE_BYTES [--mt]
 *
 * --mt: libfuse's multithreaded loop with clone_fd (one /dev/fuse fd per
 * worker thread); otherwise the single-threaded loop.  The file is "data".
 * The process runs in the foreground until unmounted (fusermount3 -u).
 */
#define FUSE_USE_VERSION 312     /* fuse_loop_cfg_*: 3.12 */
#define _GNU_SOURCE
#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
#define FILE_NAME "data"
#define MAX_WRITE (1u << 20)
#define MAX_BACKGROUND 64

static uint8_t *store;
static uint64_t store_size;

static void fill_attr(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0644;
        st->st_nlink = 1;
        st->st_size = (off_t)store_size;
        st->st_blksize = 4096;
        st->st_blocks = (blkcnt_t)(store_size / 512);
    }
}

static void cm_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
    if (conn->max_write > MAX_WRITE)
        conn->max_write = MAX_WRITE;
    conn->max_background = MAX_BACKGROUND;
    conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
}

static void cm_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    if (parent != FUSE_ROOT_ID || strcmp(name, FILE_NAME) != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = FILE_INO;
    e.attr_timeout = 3600.0;
    e.entry_timeout = 3600.0;
    fill_attr(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void cm_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if (ino != FUSE_ROOT_ID && ino != FILE_INO) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, 3600.0);
}

/* the size is fixed, like a drive's capacity: setting it to anything else
 * fails, times and modes are accepted and ignored */
static void cm_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != store_size) {
        fuse_reply_err(req, EPERM);
        return;
    }
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, 3600.0);
}

static void cm_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    char buf[512];
    size_t n = 0;
    struct stat st;
    (void)fi;
    if (ino != FUSE_ROOT_ID) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (size > sizeof(buf))
        size = sizeof(buf);
    memset(&st, 0, sizeof(st));
    const char *names[] = { ".", "..", FILE_NAME };
    fuse_ino_t inos[] = { FUSE_ROOT_ID, FUSE_ROOT_ID, FILE_INO };
    for (off_t i = off; i < 3; i++) {
        st.st_ino = inos[i];
        st.st_mode = i < 2 ? S_IFDIR : S_IFREG;
        size_t len = fuse_add_direntry(req, buf + n, size - n, names[i], &st, i + 1);
        if (len > size - n)
            break;
        n += len;
    }
    fuse_reply_buf(req, buf, n);
}

static void cm_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (ino != FILE_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void cm_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    if ((uint64_t)off >= store_size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (size > store_size - (uint64_t)off)
        size = store_size - (uint64_t)off;
    /* writev straight from the store: the one copy is the kernel's */
    fuse_reply_buf(req, (const char *)store + off, size);
}

static void cm_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    if ((uint64_t)off >= store_size || size > store_size - (uint64_t)off) {
        fuse_reply_err(req, ENOSPC);
        return;
    }
    memcpy(store + off, buf, size);
    fuse_reply_write(req, size);
}

static void cm_ok(fuse_req_t req)
{
    fuse_reply_err(req, 0);
}

static void cm_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    cm_ok(req);
}

static void cm_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino; (void)datasync; (void)fi;
    cm_ok(req);
}

static void cm_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    cm_ok(req);
}

static void cm_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    (void)ino; (void)fi;
    if ((uint64_t)off > store_size || (uint64_t)len > store_size - (uint64_t)off) {
        fuse_reply_err(req, ENOSPC);
        return;
    }
    if (mode & FALLOC_FL_PUNCH_HOLE)
        memset(store + off, 0, (size_t)len);
    cm_ok(req);
}

static const struct fuse_lowlevel_ops ops = {
    .init = cm_init,
    .lookup = cm_lookup,
    .getattr = cm_getattr,
    .setattr = cm_setattr,
    .readdir = cm_readdir,
    .open = cm_open,
    .read = cm_read,
    .write = cm_write,
    .flush = cm_flush,
    .fsync = cm_fsync,
    .release = cm_release,
    .fallocate = cm_fallocate,
};

int main(int argc, char **argv)
{
    char *end;
    int mt = 0, rc;
    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "--mt") != 0)) {
        fprintf(stderr, "usage: %s MOUNTPOINT SIZE_BYTES [--mt]\n", argv[0]);
        return 2;
    }
    mt = argc == 4;
    errno = 0;
    store_size = strtoull(argv[2], &end, 0);
    if (errno || *end || store_size == 0) {
        fprintf(stderr, "cmemfs: bad size %s\n", argv[2]);
        return 2;
    }
    /* anonymous and untouched: pages become resident as fio writes them */
    store = mmap(NULL, store_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
    if (store == MAP_FAILED) {
        perror("cmemfs: mmap");
        return 1;
    }
    char *fargv[] = { argv[0], "-o", "fsname=cmemfs,default_permissions,allow_other", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (se == NULL)
        return 1;
    if (fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, argv[1]) != 0) {
        fuse_session_destroy(se);
        return 1;
    }
    if (mt) {
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        rc = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
    } else {
        rc = fuse_session_loop(se);
    }
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return rc ? 1 : 0;
}
