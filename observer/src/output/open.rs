//! Opening `--output FILE` as a root daemon must: a path that another user
//! could have planted (a symlink to /etc/shadow, a hard link, a FIFO) is
//! refused, as logrotate and systemd refuse them, and a new file is 0640
//! whatever the umask. `observer report --html FILE` writes its page the same
//! way (`open_truncate`).

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::Path,
};

/// The mode of a file the daemon creates: the group (adm, say) may read it.
pub const MODE: u32 = 0o640;

/// Why a path is not a safe place to write; the message names the flag and
/// the path (`path` is `--output FILE`, `--html FILE`).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: is a symbolic link; give the real path (a root daemon does not follow links)")]
    Symlink { path: String },
    #[error("{path}: not a regular file ({kind})")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: is on {fs}, where records cannot be written")]
    PseudoFs { path: String, fs: &'static str },
    #[error(
        "{path}: {why} in {dir}, a directory other users can write; refusing it (it may have been planted)"
    )]
    Planted {
        path: String,
        dir: String,
        why: String,
    },
}

/// Opens `path` for appending, creating it 0640 if missing, without following
/// a symbolic link, and refuses what is not safe for root to write to.
pub fn open_append(path: &Path) -> Result<File, OpenError> {
    open_checked(path, "--output", true)
}

/// Opens `path` (the file of `flag`) to be written whole: the same checks as
/// `open_append`, then emptied; a new file is 0644 less the umask.
pub fn open_truncate(path: &Path, flag: &str) -> Result<File, OpenError> {
    let file = open_checked(path, flag, false)?;
    file.set_len(0).map_err(|source| OpenError::Io {
        path: format!("{flag} {}", path.display()),
        source,
    })?;
    Ok(file)
}

fn open_checked(path: &Path, flag: &str, append: bool) -> Result<File, OpenError> {
    let shown = format!("{flag} {}", path.display());
    let io_err = |source: io::Error| OpenError::Io {
        path: shown.clone(),
        source,
    };
    // O_NONBLOCK: opening a FIFO without a reader must not hang (it is refused below).
    let base = || {
        let mut o = OpenOptions::new();
        o.append(append)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
        o
    };
    let mode = if append { MODE } else { 0o644 };
    let (file, created) = match base().create_new(true).mode(mode).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match base().open(path) {
            Ok(f) => (f, false),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::Symlink { path: shown });
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                return Err(OpenError::NotRegular {
                    path: shown,
                    kind: "a FIFO without a reader",
                });
            }
            Err(e) => return Err(io_err(e)),
        },
        Err(e) => return Err(io_err(e)),
    };
    let meta = file.metadata().map_err(io_err)?;
    // The null device: `--output /dev/null` when only `--metrics` is wanted.
    if meta.mode() & libc::S_IFMT == libc::S_IFCHR && meta.rdev() == libc::makedev(1, 3) {
        clear_nonblock(&file).map_err(io_err)?;
        return Ok(file);
    }
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular {
            path: shown,
            kind: file_kind(meta.mode()),
        });
    }
    if let Some(fs) = pseudo_fs(&file) {
        return Err(OpenError::PseudoFs { path: shown, fs });
    }
    if created && append {
        // The umask may have taken bits away (0600 under 077): say what we mean.
        file.set_permissions(std::fs::Permissions::from_mode(MODE))
            .map_err(io_err)?;
    } else {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let dir_meta = std::fs::metadata(dir).map_err(io_err)?;
        if let Some(why) = planted(
            meta.uid(),
            meta.nlink(),
            dir_meta.mode(),
            nix::unistd::geteuid().as_raw(),
        ) {
            return Err(OpenError::Planted {
                path: shown,
                dir: dir.display().to_string(),
                why,
            });
        }
    }
    // Writes block (the writer thread owns them); only the open had to not.
    clear_nonblock(&file).map_err(io_err)?;
    Ok(file)
}

/// Why an existing file in a directory of mode `dir_mode` looks planted by
/// another user, or `None` when it is safe: in a directory only its owner can
/// write, anything goes; in one others can write (/tmp), the file must be ours
/// and must not be a hard link to something else.
fn planted(file_uid: u32, nlink: u64, dir_mode: u32, euid: u32) -> Option<String> {
    if dir_mode & 0o022 == 0 {
        return None;
    }
    if file_uid != euid {
        return Some(format!("the file belongs to uid {file_uid}"));
    }
    (nlink > 1).then(|| format!("the file has {nlink} hard links"))
}

fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "not a regular file",
    }
}

/// Kernel pseudo-filesystems whose "files" are interfaces, not storage.
fn pseudo_fs(file: &File) -> Option<&'static str> {
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer and the descriptor is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(match st.f_type as i64 {
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x6367_7270 => "cgroup2",
        0x0027_e0eb => "cgroup",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0xcafe_4a11 => "bpffs",
        0x7363_6673 => "securityfs",
        _ => return None,
    })
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_files_are_those_of_others_in_shared_directories() {
        const TMP: u32 = 0o41777; // sticky, world-writable
        const VAR_LOG: u32 = 0o40755;
        assert_eq!(planted(1000, 1, VAR_LOG, 0), None, "root-only directory");
        assert!(planted(1000, 1, TMP, 0).is_some_and(|w| w.contains("uid 1000")));
        assert!(planted(0, 2, TMP, 0).is_some_and(|w| w.contains("hard links")));
        assert_eq!(planted(0, 1, TMP, 0), None);
        assert!(planted(0, 1, 0o40775, 1000).is_some(), "group-writable");
    }

    #[test]
    fn refuses_symlinks_fifos_and_pseudo_files() {
        let dir = std::env::temp_dir().join(format!("observer-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let target = dir.join("target");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_append(&link).unwrap_err();
        assert!(matches!(e, OpenError::Symlink { .. }), "{e}");
        assert!(
            !target.exists(),
            "a dangling link must not create its target"
        );
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_append(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = open_append(Path::new("/proc/version")).unwrap_err();
        assert!(e.to_string().starts_with("--output /proc/version:"), "{e}");
        let e = open_append(&dir).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        // The null device is the one device taken (metrics only); others are not.
        open_append(Path::new("/dev/null")).unwrap();
        let e = open_append(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        // Created 0640 whatever the umask.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let new = dir.join("events.jsonl");
        let made = open_append(&new);
        nix::sys::stat::umask(old);
        made.unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, MODE);
        // A page written whole: through no link, emptied when it exists.
        let e = open_truncate(&link, "--html").unwrap_err();
        assert!(e.to_string().starts_with("--html "), "{e}");
        assert!(matches!(e, OpenError::Symlink { .. }), "{e}");
        let page = dir.join("page.html");
        std::fs::write(&page, "old contents, longer than the new").unwrap();
        std::io::Write::write_all(&mut open_truncate(&page, "--html").unwrap(), b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&page).unwrap(), "new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
