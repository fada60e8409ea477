/* System calls that Python 3.11's os module lacks. Each returns what the
 * kernel returns (-1 with errno set on failure); the Python wrappers in
 * sockworker/sandbox/native.py turn that into OSError. */

#ifndef SOCKWORKER_NATIVE_H
#define SOCKWORKER_NATIVE_H

int sw_unshare(int flags);
int sw_setns(int fd, int nstype);
int sw_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data);
int sw_umount2(const char *target, int flags);
int sw_pivot_root(const char *new_root, const char *put_old);
long sw_clone3(unsigned long long flags, int cgroup_fd, int exit_signal);
int sw_clone3_supported(void);
int sw_fsopen(const char *fstype);
int sw_fsconfig_string(int fs_fd, const char *key, const char *value);
int sw_fsconfig_create(int fs_fd);
int sw_fsmount(int fs_fd, unsigned int attr_flags);
int sw_move_mount_fd(int mount_fd, const char *target);

#endif
