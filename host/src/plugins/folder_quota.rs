//! What a plugin may keep in its writable folders: at most
//! `max_folder_bytes` of file contents and `max_folder_files` entries, per
//! plugin and tenant (each tenant has folders of its own).
//!
//! wasmtime-wasi has no hook for this, so the few `wasi:filesystem`
//! functions that make a folder grow are defined again over its own
//! (`allow_shadowing`): `write`, `set-size`, the write and append streams
//! (wrapped so every write through them is counted), `open-at` with
//! `create`, `create-directory-at`, `symlink-at` and `link-at`. Each charges
//! what it could add *before* it runs and is refused with
//! `insufficient-space` (`ENOSPC`, as a full disk would) when that would
//! pass the quota; the call then fails with `plugin_folder_quota` however
//! the plugin handled the error.
//!
//! A charge is an upper bound (rewriting a file's first kilobyte twice
//! charges two kilobytes), so the folders are measured again, by walking
//! them off the async runtime, once no call of that plugin and tenant is
//! running: what the files really take then replaces what was charged.
//! They are first measured at the first write, so a call that writes
//! nothing costs nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::component::{Linker, Resource};
use wasmtime::{Result, StoreContextMut};
use wasmtime_wasi::filesystem::{WasiFilesystemCtxView, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    Descriptor, DescriptorFlags, ErrorCode, Host, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{
    DynOutputStream, FsError, OutputStream, Pollable, StreamError, StreamResult,
};

use super::state::CallState;

/// The `wasi:filesystem/types` instance wasmtime-wasi defines (guests
/// importing any 0.2 version are matched to it).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// The usage of the writable folders of each plugin and tenant.
#[derive(Default)]
pub struct FolderUsages {
    by_folders: Mutex<HashMap<Vec<PathBuf>, Arc<FolderUsage>>>,
}

impl FolderUsages {
    /// The usage of exactly these folders (one plugin's writable grants, as
    /// one tenant sees them).
    pub fn of(&self, folders: Vec<PathBuf>) -> Arc<FolderUsage> {
        let mut by_folders = self.by_folders.lock().unwrap();
        by_folders
            .entry(folders)
            .or_insert_with_key(|folders| Arc::new(FolderUsage::new(folders.clone())))
            .clone()
    }
}

/// What one plugin keeps, for one tenant, in its writable folders.
pub struct FolderUsage {
    folders: Vec<PathBuf>,
    state: Mutex<UsageState>,
}

#[derive(Debug, Default)]
struct UsageState {
    /// What the last walk found, once there was one.
    measured: Option<Measure>,
    /// Charged since the last walk began: an upper bound of the growth.
    charged: Measure,
    /// Calls running on these folders.
    calls: u32,
    /// Whether a call charged anything since the last walk.
    dirty: bool,
}

/// File bytes and entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub bytes: u64,
    pub files: u64,
}

impl FolderUsage {
    fn new(folders: Vec<PathBuf>) -> Self {
        Self {
            folders,
            state: Mutex::default(),
        }
    }

    /// What the folders hold, as far as is known: the last walk plus what
    /// was charged since. `None` before the first walk.
    #[cfg(test)]
    fn known(&self) -> Option<Measure> {
        let state = self.state.lock().unwrap();
        state.measured.map(|measured| Measure {
            bytes: measured.bytes.saturating_add(state.charged.bytes),
            files: measured.files.saturating_add(state.charged.files),
        })
    }

    /// Walks the folders unless a walk already did.
    async fn measure_once(self: &Arc<Self>) {
        if self.state.lock().unwrap().measured.is_none() {
            self.clone().remeasure().await;
        }
    }

    /// Walks the folders (on a blocking thread) and takes what they hold in
    /// place of what was charged before the walk began. What is charged
    /// while it walks stays charged: it may be counted twice until the next
    /// walk, never missed.
    async fn remeasure(self: Arc<Self>) {
        let before = {
            let mut state = self.state.lock().unwrap();
            state.dirty = false;
            state.charged
        };
        let usage = self.clone();
        let Ok(measured) = tokio::task::spawn_blocking(move || walk(&usage.folders)).await else {
            return;
        };
        let mut state = self.state.lock().unwrap();
        state.measured = Some(measured);
        state.charged.bytes = state.charged.bytes.saturating_sub(before.bytes);
        state.charged.files = state.charged.files.saturating_sub(before.files);
    }

    /// Charges `add` if it fits within `quota`. Either way the folders are
    /// measured again once no call is using them: after a refusal too, so
    /// that room made since (the operator deleting files) is seen.
    fn try_charge(&self, add: Measure, quota: Measure) -> bool {
        let mut state = self.state.lock().unwrap();
        state.dirty = true;
        let measured = state.measured.unwrap_or_default();
        let bytes = measured
            .bytes
            .saturating_add(state.charged.bytes)
            .saturating_add(add.bytes);
        let files = measured
            .files
            .saturating_add(state.charged.files)
            .saturating_add(add.files);
        if bytes > quota.bytes || files > quota.files {
            return false;
        }
        state.charged.bytes += add.bytes;
        state.charged.files += add.files;
        true
    }

    /// Gives back a charge whose operation failed.
    fn refund(&self, charge: Measure) {
        let mut state = self.state.lock().unwrap();
        state.charged.bytes = state.charged.bytes.saturating_sub(charge.bytes);
        state.charged.files = state.charged.files.saturating_sub(charge.files);
    }
}

/// Every entry below `folders` (files, folders, links; links not followed)
/// and the bytes of the regular files among them. What cannot be read
/// counts as nothing: the plugin could not have written there either.
fn walk(folders: &[PathBuf]) -> Measure {
    fn visit(folder: &Path, measure: &mut Measure) {
        let Ok(entries) = std::fs::read_dir(folder) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.path().symlink_metadata() else {
                continue;
            };
            measure.files += 1;
            if metadata.is_file() {
                measure.bytes = measure.bytes.saturating_add(metadata.len());
            } else if metadata.is_dir() {
                visit(&entry.path(), measure);
            }
        }
    }
    let mut measure = Measure::default();
    for folder in folders {
        visit(folder, &mut measure);
    }
    measure
}

/// One call's share of a [`FolderUsage`]: held by the call's state and by
/// every write stream it opens, so the folders are measured again only when
/// the call and all its streams are gone.
pub struct FolderCall {
    usage: Arc<FolderUsage>,
    quota: Measure,
    /// Whether the call was refused a write.
    crossed: AtomicBool,
}

impl FolderCall {
    pub fn start(usage: Arc<FolderUsage>, quota: Measure) -> Arc<Self> {
        usage.state.lock().unwrap().calls += 1;
        Arc::new(Self {
            usage,
            quota,
            crossed: AtomicBool::new(false),
        })
    }

    /// Whether a write was refused for want of room.
    pub fn crossed(&self) -> bool {
        self.crossed.load(Ordering::Relaxed)
    }

    /// Charges `add`, or refuses it with `ENOSPC`.
    async fn charge(&self, add: Measure) -> std::io::Result<()> {
        self.usage.measure_once().await;
        self.charge_measured(add)
    }

    /// [`FolderCall::charge`] for a write stream, which cannot wait: the
    /// folders were measured when the stream was opened.
    fn charge_measured(&self, add: Measure) -> std::io::Result<()> {
        if self.usage.try_charge(add, self.quota) {
            Ok(())
        } else {
            self.crossed.store(true, Ordering::Relaxed);
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
    }
}

impl Drop for FolderCall {
    fn drop(&mut self) {
        let remeasure = {
            let mut state = self.usage.state.lock().unwrap();
            state.calls -= 1;
            state.calls == 0 && state.dirty
        };
        if remeasure && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.usage.clone().remeasure());
        }
    }
}

/// Defines the growing functions of `wasi:filesystem/types` again over
/// wasmtime-wasi's, charging the call's [`FolderCall`] when it has one.
pub fn add_to_linker(linker: &mut Linker<CallState>) -> Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;

    types.func_wrap_async(
        "[method]descriptor.write",
        |mut store: StoreContextMut<'_, CallState>,
         (fd, buffer, offset): (Resource<Descriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let charge = Measure {
                    bytes: buffer.len() as u64,
                    files: 0,
                };
                charged(&mut store, charge, async move |view| {
                    HostDescriptor::write(view, fd, buffer, offset).await
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store: StoreContextMut<'_, CallState>, (fd, size): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let charge = match growth_to(&mut store, &fd, size).await? {
                    Ok(charge) => charge,
                    Err(error) => return Ok((Err(error),)),
                };
                charged(&mut store, charge, async move |view| {
                    HostDescriptor::set_size(view, fd, size).await
                })
                .await
            })
        },
    )?;

    // Synchronous for the guest; asynchronous here only to measure the
    // folders before the first write, which a stream's writes cannot wait
    // for.
    types.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store: StoreContextMut<'_, CallState>, (fd, offset): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                counted_stream(&mut store, |view| {
                    HostDescriptor::write_via_stream(view, fd, offset)
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: StoreContextMut<'_, CallState>, (fd,): (Resource<Descriptor>,)| {
            Box::new(async move {
                counted_stream(&mut store, |view| {
                    HostDescriptor::append_via_stream(view, fd)
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, CallState>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                // Counted once per `create`, whether or not the file was
                // there: the walk after the call puts it right.
                let charge = Measure {
                    bytes: 0,
                    files: u64::from(open_flags.contains(OpenFlags::CREATE)),
                };
                charged(&mut store, charge, async move |view| {
                    HostDescriptor::open_at(view, fd, path_flags, path, open_flags, flags).await
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.create-directory-at",
        |mut store: StoreContextMut<'_, CallState>, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                charged(&mut store, ONE_ENTRY, async move |view| {
                    HostDescriptor::create_directory_at(view, fd, path).await
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store: StoreContextMut<'_, CallState>,
         (fd, old_path, new_path): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                charged(&mut store, ONE_ENTRY, async move |view| {
                    HostDescriptor::symlink_at(view, fd, old_path, new_path).await
                })
                .await
            })
        },
    )?;

    types.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store: StoreContextMut<'_, CallState>,
         (fd, old_flags, old_path, new_fd, new_path): (
            Resource<Descriptor>,
            PathFlags,
            String,
            Resource<Descriptor>,
            String,
        )| {
            Box::new(async move {
                charged(&mut store, ONE_ENTRY, async move |view| {
                    HostDescriptor::link_at(view, fd, old_flags, old_path, new_fd, new_path).await
                })
                .await
            })
        },
    )?;

    linker.allow_shadowing(false);
    Ok(())
}

const ONE_ENTRY: Measure = Measure { bytes: 0, files: 1 };

/// Runs one operation that makes a folder grow by at most `charge`: charges
/// the call's folders first and refuses the operation with
/// `insufficient-space` when that would pass the quota, gives the charge
/// back if the operation fails, and returns its result as the guest
/// receives it.
async fn charged<T>(
    store: &mut StoreContextMut<'_, CallState>,
    charge: Measure,
    operation: impl AsyncFnOnce(&mut WasiFilesystemCtxView<'_>) -> Result<T, FsError>,
) -> Result<(Result<T, ErrorCode>,)> {
    let folders = store.data().folder_call();
    if let Some(folders) = &folders
        && let Err(full) = folders.charge(charge).await
    {
        return Ok((Err(ErrorCode::from(&full)),));
    }
    let mut view = store.data_mut().filesystem();
    let result = operation(&mut view).await;
    if let (Some(folders), Err(_)) = (&folders, &result) {
        folders.usage.refund(charge);
    }
    Ok((wit_result(&mut view, result)?,))
}

/// What setting a file's size to `size` adds: the difference when it makes
/// the file longer (even sparse: its length is what it counts for), nothing
/// when the call writes into no counted folder.
async fn growth_to(
    store: &mut StoreContextMut<'_, CallState>,
    fd: &Resource<Descriptor>,
    size: u64,
) -> Result<Result<Measure, ErrorCode>> {
    if store.data().folder_call().is_none() {
        return Ok(Ok(Measure::default()));
    }
    let mut view = store.data_mut().filesystem();
    let result = HostDescriptor::stat(&mut view, Resource::new_borrow(fd.rep())).await;
    Ok(wit_result(&mut view, result)?.map(|stat| Measure {
        bytes: size.saturating_sub(stat.size),
        files: 0,
    }))
}

/// A wasmtime-wasi result as the guest receives it: its error as a WIT
/// error code, or a trap when it is not one (a bad handle).
fn wit_result<T, V: Host>(
    view: &mut V,
    result: Result<T, FsError>,
) -> Result<Result<T, ErrorCode>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(error) => Ok(Err(view.convert_error_code(error)?)),
    }
}

/// Opens a write or append stream on a file; when the call writes into
/// counted folders, measures them first (a stream's writes cannot wait for
/// that) and puts the stream back in the table wrapped, so each write
/// through it is charged.
async fn counted_stream(
    store: &mut StoreContextMut<'_, CallState>,
    open: impl FnOnce(&mut WasiFilesystemCtxView<'_>) -> Result<Resource<DynOutputStream>, FsError>,
) -> Result<(Result<Resource<DynOutputStream>, ErrorCode>,)> {
    let folders = store.data().folder_call();
    if let Some(folders) = &folders {
        folders.usage.measure_once().await;
    }
    let mut view = store.data_mut().filesystem();
    let result = open(&mut view).and_then(|stream| {
        let Some(folders) = folders else {
            return Ok(stream);
        };
        let inner = view.table.delete(stream)?;
        let counted: DynOutputStream = Box::new(CountedStream {
            inner: Some(inner),
            folders,
        });
        Ok(view.table.push(counted)?)
    });
    Ok((wit_result(&mut view, result)?,))
}

/// A file's write stream whose every write is charged first.
struct CountedStream {
    /// `None` once dropped.
    inner: Option<DynOutputStream>,
    folders: Arc<FolderCall>,
}

impl Drop for CountedStream {
    /// A write may still be under way on a blocking thread (a stream
    /// writes in the background): the call's share is held until it has
    /// finished, so the walk that follows the call sees what it wrote.
    fn drop(&mut self) {
        let (Some(mut inner), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let folders = self.folders.clone();
        runtime.spawn(async move {
            inner.cancel().await;
            drop(folders);
        });
    }
}

impl CountedStream {
    fn inner(&mut self) -> &mut DynOutputStream {
        self.inner.as_mut().expect("only taken when dropped")
    }

    fn charge(&self, bytes: usize) -> StreamResult<()> {
        self.folders
            .charge_measured(Measure {
                bytes: bytes as u64,
                files: 0,
            })
            .map_err(|full| StreamError::LastOperationFailed(full.into()))
    }
}

#[async_trait::async_trait]
impl Pollable for CountedStream {
    async fn ready(&mut self) {
        self.inner().ready().await
    }
}

#[async_trait::async_trait]
impl OutputStream for CountedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner().write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner().flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner().check_write()
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner().blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, count: usize) -> StreamResult<()> {
        self.charge(count)?;
        self.inner().write_zeroes(count)
    }

    async fn cancel(&mut self) {
        self.inner().cancel().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(bytes: u64, files: u64) -> Measure {
        Measure { bytes, files }
    }

    #[tokio::test]
    async fn charges_stop_at_the_quota_and_a_walk_replaces_them() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("old"), vec![0; 100]).unwrap();
        let usages = FolderUsages::default();
        let usage = usages.of(vec![folder.path().to_owned()]);
        let call = FolderCall::start(usage.clone(), quota(1_000, 3));

        call.charge(Measure {
            bytes: 800,
            files: 1,
        })
        .await
        .unwrap();
        assert_eq!(
            usage.known(),
            Some(Measure {
                bytes: 900,
                files: 2
            })
        );
        let full = call
            .charge(Measure {
                bytes: 101,
                files: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
        assert!(call.crossed());
        call.charge(Measure {
            bytes: 100,
            files: 1,
        })
        .await
        .unwrap();
        assert!(call.charge(ONE_ENTRY).await.is_err(), "a fourth entry");

        // The call wrote less than it was charged for: the walk after it
        // ends finds what is really there.
        std::fs::write(folder.path().join("new"), vec![0; 10]).unwrap();
        drop(call);
        for _ in 0..100 {
            if usage.known()
                == Some(Measure {
                    bytes: 110,
                    files: 2,
                })
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("not measured again: {:?}", usage.known());
    }

    #[tokio::test]
    async fn room_made_from_outside_is_seen_after_the_refused_call() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("big"), vec![0; 900]).unwrap();
        let usage = FolderUsages::default().of(vec![folder.path().to_owned()]);
        let call = FolderCall::start(usage.clone(), quota(1_000, 10));
        assert!(
            call.charge(Measure {
                bytes: 500,
                files: 0
            })
            .await
            .is_err()
        );
        // The operator deletes the big file; the refused call ends.
        std::fs::remove_file(folder.path().join("big")).unwrap();
        drop(call);
        for _ in 0..100 {
            if usage.known() == Some(Measure::default()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let call = FolderCall::start(usage.clone(), quota(1_000, 10));
        call.charge(Measure {
            bytes: 500,
            files: 0,
        })
        .await
        .unwrap();
        assert!(!call.crossed());
    }

    #[tokio::test]
    async fn a_refund_gives_back_a_failed_operations_charge() {
        let folder = tempfile::tempdir().unwrap();
        let usage = FolderUsages::default().of(vec![folder.path().to_owned()]);
        let call = FolderCall::start(usage.clone(), quota(10, 10));
        call.charge(Measure {
            bytes: 10,
            files: 0,
        })
        .await
        .unwrap();
        usage.refund(Measure {
            bytes: 10,
            files: 0,
        });
        call.charge(Measure {
            bytes: 10,
            files: 0,
        })
        .await
        .unwrap();
    }

    #[test]
    fn a_walk_counts_entries_and_file_bytes_without_following_links() {
        let folder = tempfile::tempdir().unwrap();
        let root = folder.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), [1; 7]).unwrap();
        std::fs::write(root.join("b"), [1; 5]).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(
            walk(&[root.to_owned()]),
            Measure {
                bytes: 12,
                files: 4
            }
        );
    }
}
