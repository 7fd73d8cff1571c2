//! cgroup ids (as `bpf_get_current_cgroup_id` gives them: the cgroup2 directory's
//! inode) to paths, and container ids from paths. Resolved once, cached.

use foldhash::{HashMap, HashMapExt};
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

pub struct Cgroups {
    root: PathBuf,
    map: HashMap<u64, Named>,
    scanned: Option<Instant>,
}

/// What a cgroup's path says, shared by every record from it (a record
/// takes a reference, not a copy).
#[derive(Clone)]
pub struct Named {
    pub path: Arc<str>,
    pub container_id: Option<Arc<str>>,
    pub unit: Option<Arc<str>>,
}

impl Named {
    fn of(path: String) -> Named {
        Named {
            container_id: container_id(&path).map(Arc::from),
            unit: crate::kernel::procs::systemd_unit(&path).map(Arc::from),
            path: path.into(),
        }
    }
}

impl Cgroups {
    pub fn new(root: PathBuf) -> Cgroups {
        Cgroups {
            root,
            map: HashMap::new(),
            scanned: None,
        }
    }

    /// The cgroup's path under the cgroup2 mount (`/system.slice/x.service`),
    /// with the container id and systemd unit it names.
    pub fn named(&mut self, id: u64) -> Option<&Named> {
        if !self.map.contains_key(&id)
            && self
                .scanned
                .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
        {
            self.scan();
        }
        self.map.get(&id)
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(m) = std::fs::metadata(&dir) {
                let rel = relative(&self.root, &dir);
                self.map.entry(m.ino()).or_insert_with(|| Named::of(rel));
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// `dir` relative to the cgroup2 mount `root`, as `/a/b` (`/` for the root).
pub fn relative(root: &Path, dir: &Path) -> String {
    let rel = dir
        .strip_prefix(root)
        .unwrap_or(dir)
        .to_string_lossy()
        .into_owned();
    format!("/{}", rel.trim_start_matches('/'))
}

/// The container id in a cgroup path, as docker, containerd, CRI-O, podman and
/// systemd name their scopes: the last 64-hex-digit id in the path.
pub fn container_id(path: &str) -> Option<&str> {
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = name.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1d2c4b5a6978877665544332211000aabbccddeeff00112233445566778899";

    #[test]
    fn container_ids_from_the_usual_layouts() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope"
            ),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/kubepods/besteffort/pod1/crio-{ID}.scope"),
        ] {
            assert_eq!(container_id(&path), Some(ID), "{path}");
        }
        assert_eq!(container_id("/system.slice/nginx.service"), None);
        assert_eq!(container_id("/user.slice/user-1000.slice"), None);
    }

    #[test]
    fn paths_relative_to_the_mount() {
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(relative(root, root), "/");
        assert_eq!(
            relative(root, &root.join("system.slice/x.service")),
            "/system.slice/x.service"
        );
    }
}
