//! Hot reload of the rules file: on a change in its directory, or on SIGHUP, validate and swap — or keep the last good rules.
//!
//! The directory is watched rather than the file because editors and
//! Kubernetes ConfigMaps replace files (rename, symlink swap) instead of
//! writing in place. A ConfigMap mounted as a directory holds
//! `rules.yaml -> ..data/rules.yaml` and `..data -> ..<timestamp>/`; the
//! kubelet updates it by writing a new `..<timestamp>/` and renaming a new
//! `..data_tmp` symlink over `..data`, so the file's own link never changes:
//! any change in the directory is taken as a reason to read the file again
//! (through the links). Opening or reading a file is not a change (the
//! reload's own read would otherwise trigger the next one). Events are
//! debounced, and a reload whose content did not change is skipped. Events in
//! flight keep the `Arc<Rules>` they started with.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::rules::Rules;
use crate::telemetry;

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Reloads `path` into `current` if it is valid and changed; returns whether it swapped.
pub fn reload(path: &Path, current: &ArcSwap<Rules>, last_hash: &mut Option<u64>) -> bool {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            error!(path = %path.display(), error = %e, "cannot read the rules file; keeping the last good rules");
            telemetry::record_rules_load(false, None);
            return false;
        }
    };
    let hash = content_hash(&text);
    if *last_hash == Some(hash) {
        return false;
    }
    match Rules::from_yaml(&text, &path.display().to_string()) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                warn!(%warning, "rules warning");
            }
            let count = loaded.rules.rule_count();
            current.store(Arc::new(loaded.rules));
            *last_hash = Some(hash);
            telemetry::record_rules_load(true, Some(count));
            info!(path = %path.display(), rules = count, "rules reloaded");
            true
        }
        Err(errors) => {
            for diagnostic in &errors.0 {
                error!(%diagnostic, "rules error");
            }
            // Remember the bad content so the same broken file is not re-reported on every touch.
            *last_hash = Some(hash);
            telemetry::record_rules_load(false, None);
            error!(
                path = %path.display(),
                errors = errors.0.len(),
                "rules file is invalid; keeping the last good rules"
            );
            false
        }
    }
}

/// [`reload`] on a blocking thread: reading and parsing a large rules file
/// (regexes included) must not hold up the runtime's workers, which carry
/// the deliveries.
async fn reload_off_runtime(
    path: &Path,
    current: &Arc<ArcSwap<Rules>>,
    last_hash: &mut Option<u64>,
) -> bool {
    let (path, current, mut hash) = (path.to_path_buf(), Arc::clone(current), *last_hash);
    match tokio::task::spawn_blocking(move || {
        let swapped = reload(&path, &current, &mut hash);
        (swapped, hash)
    })
    .await
    {
        Ok((swapped, hash)) => {
            *last_hash = hash;
            swapped
        }
        Err(e) => {
            error!(error = %e, "the rules reload did not finish; keeping the last good rules");
            telemetry::record_rules_load(false, None);
            false
        }
    }
}

/// Hash of the file as loaded at start, so the first no-op event is skipped.
pub fn initial_hash(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok().map(|t| content_hash(&t))
}

fn content_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Watches `path` until `shutdown`, reloading into `current` on changes and SIGHUP.
pub async fn watch(path: PathBuf, current: Arc<ArcSwap<Rules>>, shutdown: CancellationToken) {
    // One pending signal is all the debounce needs: a full channel already
    // says "something changed", so bursts do not queue up.
    let (tx, rx) = mpsc::channel(1);
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| is_change(&event.kind)) {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut watcher| {
        watcher.watch(&directory, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    // Keep the watcher alive for the whole loop; without it, only SIGHUP reloads.
    let _watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            warn!(directory = %directory.display(), error = %e, "cannot watch the rules directory; reload with SIGHUP");
            None
        }
    };
    watch_changes(path, current, shutdown, rx, hangup_signals()).await;
}

/// Whether a file event in the rules directory may have changed the rules:
/// anything but opening or reading a file (inotify reports the reload's own
/// read of `rules.yaml` as an open in the watched directory). A file closed
/// after writing counts.
fn is_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

/// The reload loop of [`watch`], fed by its file events (`changes`).
async fn watch_changes(
    path: PathBuf,
    current: Arc<ArcSwap<Rules>>,
    shutdown: CancellationToken,
    mut changes: mpsc::Receiver<()>,
    mut hangups: Hangups,
) {
    let mut last_hash = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || initial_hash(&path))
            .await
            .ok()
            .flatten()
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            Some(()) = changes.recv() => {
                if !settled(&mut changes, &shutdown).await {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = reload_off_runtime(&path, &current, &mut last_hash) => {}
                }
            }
            _ = next_hangup(&mut hangups) => {
                info!("SIGHUP: reloading rules");
                last_hash = None;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = reload_off_runtime(&path, &current, &mut last_hash) => {}
                }
            }
        }
    }
}

/// Waits until no file event came for [`DEBOUNCE`], so a burst (write,
/// rename, chmod) is reloaded once; false when `shutdown` came first, which
/// a directory that never stops changing must not be able to delay.
async fn settled(changes: &mut mpsc::Receiver<()>, shutdown: &CancellationToken) -> bool {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return false,
            next = tokio::time::timeout(DEBOUNCE, changes.recv()) => match next {
                Ok(Some(())) => continue,
                // Quiet for DEBOUNCE, or the watcher is gone: reload what is there.
                Ok(None) | Err(_) => return true,
            },
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangup_signals() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signals() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) {
    match hangups {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) {
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: 1\ndefaults:\n  slack_channel: C1\nrules: []\n";
    const OTHER: &str = "version: 1\ndefaults:\n  slack_channel: C2\nrules:\n  - name: a\n    matchers: []\n    notify: []\n";

    #[test]
    fn a_valid_change_swaps_and_an_invalid_one_keeps_the_last_good_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let current = ArcSwap::from_pointee(Rules::load(&path).unwrap().rules);
        let mut hash = initial_hash(&path);

        assert!(
            !reload(&path, &current, &mut hash),
            "unchanged content is not reloaded"
        );

        std::fs::write(&path, OTHER).unwrap();
        assert!(reload(&path, &current, &mut hash));
        assert_eq!(current.load().rule_count(), 1);

        std::fs::write(&path, "version: 1\nrules: [\n").unwrap();
        assert!(!reload(&path, &current, &mut hash));
        assert_eq!(current.load().rule_count(), 1, "the last good rules stay");
        assert_eq!(current.load().default_channel(), Some("C2"));
    }

    fn good_rules() -> (tempfile::TempDir, PathBuf, Arc<ArcSwap<Rules>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let current = Arc::new(ArcSwap::from_pointee(Rules::load(&path).unwrap().rules));
        (dir, path, current)
    }

    #[tokio::test]
    async fn a_reload_off_the_runtime_swaps_valid_rules_and_remembers_the_content() {
        let (_dir, path, current) = good_rules();
        let mut hash = initial_hash(&path);
        std::fs::write(&path, OTHER).unwrap();

        assert!(reload_off_runtime(&path, &current, &mut hash).await);
        assert_eq!(current.load().rule_count(), 1);
        assert_eq!(hash, initial_hash(&path));
        assert!(
            !reload_off_runtime(&path, &current, &mut hash).await,
            "the same content again is skipped"
        );
    }

    /// A directory that never stops changing keeps the debounce waiting for
    /// quiet; shutdown must end the watcher all the same.
    #[tokio::test]
    async fn the_watcher_ends_on_shutdown_while_changes_keep_coming() {
        let (_dir, path, current) = good_rules();
        let shutdown = CancellationToken::new();
        let (changes, events) = mpsc::channel(1);
        let watcher = tokio::spawn(watch_changes(
            path,
            current,
            shutdown.clone(),
            events,
            Hangups::default(),
        ));
        // The channel holds one change: the third send goes through only
        // once the loop has taken the second, from inside the debounce.
        for _ in 0..3 {
            changes.send(()).await.unwrap();
        }
        let churn = tokio::spawn(async move { while changes.send(()).await.is_ok() {} });

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends on shutdown")
            .unwrap();
        churn.await.unwrap();
    }

    #[test]
    fn opening_or_reading_a_file_is_not_a_change() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Read)));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(CreateKind::Any)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Any));
    }

    /// The kubelet's update of a ConfigMap mounted as a directory, step by
    /// step as its atomic writer does it.
    #[cfg(unix)]
    fn kubelet_update(dir: &Path, version: &str, rules: &str) {
        use std::os::unix::fs::symlink;
        let data = dir.join(format!("..{version}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("rules.yaml"), rules).unwrap();
        let old = std::fs::read_link(dir.join("..data")).ok();
        symlink(format!("..{version}"), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if !dir.join("rules.yaml").exists() {
            symlink("..data/rules.yaml", dir.join("rules.yaml")).unwrap();
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    /// A ConfigMap update swaps the `..data` symlink and leaves `rules.yaml`
    /// (a link to `..data/rules.yaml`) as it is; the watcher must still
    /// reload, through the real inotify watch.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_configmap_update_swapping_the_data_symlink_reloads_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_update(dir.path(), "2026_12_02_08_00_00.1", GOOD);
        let path = dir.path().join("rules.yaml");
        let current = Arc::new(ArcSwap::from_pointee(Rules::load(&path).unwrap().rules));
        assert_eq!(current.load().rule_count(), 0);
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(watch(path.clone(), Arc::clone(&current), shutdown.clone()));

        // The watch is set up inside the spawned task: update until the
        // rules change (each update new content, as a real edit is), not
        // after a sleep.
        let reloaded = tokio::time::timeout(Duration::from_secs(10), async {
            for update in 2.. {
                let rules = format!("{OTHER}# update {update}\n");
                kubelet_update(dir.path(), &format!("2026_12_02_08_05_00.{update}"), &rules);
                for _ in 0..50 {
                    if current.load().rule_count() == 1 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        shutdown.cancel();
        watcher.await.unwrap();
        assert!(reloaded.is_ok(), "the symlink swap was not seen");
        assert_eq!(current.load().default_channel(), Some("C2"));
    }

    #[tokio::test]
    async fn the_file_watcher_ends_on_shutdown() {
        let (_dir, path, current) = good_rules();
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(watch(path.clone(), current, shutdown.clone()));
        std::fs::write(&path, OTHER).unwrap();

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends on shutdown")
            .unwrap();
    }
}
