//! Network namespaces by inode: the handles sock_diag needs to look inside a
//! socket's own namespace.

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Inode of the namespace behind an `ns/net` path.
pub fn inode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// The daemon's own network namespace.
pub fn own() -> Option<u32> {
    inode(Path::new("/proc/self/ns/net"))
}

/// Every `/proc/PID/task/TID/ns/net` (a thread may have left its process's
/// namespace), and the named namespaces of `ip netns` (which may hold no process).
fn ns_paths() -> impl Iterator<Item = PathBuf> {
    let pids = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    let tasks = pids
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .flat_map(|e| {
            std::fs::read_dir(e.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| t.path().join("ns/net"))
        });
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    tasks.chain(named)
}

/// A `--netns` argument as a path: a PID names `/proc/PID/ns/net`, anything else is a path.
pub fn path_of(arg: &str) -> String {
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
        format!("/proc/{arg}/ns/net")
    } else {
        arg.to_owned()
    }
}

/// Opens the namespace with this inode: first through `hint` (a tid likely inside it),
/// then by walking /proc.
pub fn open(inode_wanted: u32, hint: Option<u32>) -> Option<File> {
    let hinted = hint.map(|tid| PathBuf::from(format!("/proc/{tid}/task/{tid}/ns/net")));
    let own = Some(PathBuf::from("/proc/self/ns/net"));
    own.into_iter()
        .chain(hinted)
        .chain(ns_paths())
        .find(|p| inode(p) == Some(inode_wanted))
        .and_then(|p| File::open(p).ok())
}

/// One open handle per network namespace that has a process in it right now.
pub fn all() -> BTreeMap<u32, File> {
    let mut found = BTreeMap::new();
    for p in ns_paths() {
        if let Some(ino) = inode(&p)
            && let std::collections::btree_map::Entry::Vacant(v) = found.entry(ino)
            && let Ok(f) = File::open(&p)
        {
            v.insert(f);
        }
    }
    found
}
