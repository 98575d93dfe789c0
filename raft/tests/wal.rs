//! The Raft log in segment files: group commit, replay, torn tails, damage,
//! segment rotation and deletion, moving an old sled log in, and openraft's
//! own storage conformance suite.
#![cfg(feature = "sled")]

use std::io::Write;
use std::path::Path;

use impetus_raft::openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use impetus_raft::openraft::testing::log::{StoreBuilder, Suite};
use impetus_raft::openraft::type_config::TypeConfigExt;
use impetus_raft::openraft::{ErrorSubject, ErrorVerb, StorageError};
use impetus_raft::{
    open_stores, Entry, LeaderId, LogId, MemSnapshotStore, Payload, SnapshotStore, StateMachineStore, TypeConfig, Vote,
    WalLogStore, LOG_ENTRY_VERSION, LOG_META_VERSION, WAL_DIR,
};

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(LeaderId { term, node_id: 1 }, index)
}

fn blank_at(term: u64, index: u64) -> Entry {
    Entry { log_id: log_id(term, index), payload: Payload::Blank }
}

fn blank(index: u64) -> Entry {
    blank_at(1, index)
}

async fn append(log: &mut WalLogStore, entries: impl IntoIterator<Item = Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries.into_iter().collect::<Vec<_>>(), IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

async fn indexes(log: &mut WalLogStore, range: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
    let got = log.try_get_log_entries(range).await.unwrap();
    got.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
}

/// `append` writes the whole batch, syncs once, then signals; truncation,
/// purge, vote and commit pointer all survive a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_syncs_once_per_batch_and_everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(3, 1);
    {
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        append(&mut log, (1..=100).map(blank)).await;
        assert_eq!(log.flush_count(), 1, "one sync for a batch of 100");
        assert_eq!(log.durable_index(), 100);

        log.truncate_after(Some(log_id(1, 90))).await.unwrap();
        assert_eq!(log.durable_index(), 90);
        log.purge(log_id(1, 10)).await.unwrap();
        append(&mut log, (91..=95).map(|i| blank_at(2, i))).await;
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(log_id(2, 93))).await.unwrap();
        // The commit pointer is not synced on its own; the next append is.
        append(&mut log, [blank_at(2, 96)]).await;
    }
    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(log.index_range(), Some((11, 96)));
    assert_eq!(log.purged(), Some(log_id(1, 10)));
    assert_eq!(indexes(&mut log, 89..=92).await, vec![(1, 89), (1, 90), (2, 91), (2, 92)]);
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 93)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 96)));
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 10)));
    assert_eq!(log.durable_index(), 96);
}

/// A log of entries 1..=10 in `dir`, closed; its newest segment.
async fn ten_entries(dir: &std::path::Path) -> std::path::PathBuf {
    let mut log = WalLogStore::<TypeConfig>::open(dir).unwrap();
    append(&mut log, (1..=10).map(blank)).await;
    log.segment_paths().pop().unwrap()
}

/// A record cut by a crash at the end of the newest segment was never
/// acknowledged: reopening cuts it off, keeps everything before it, and the
/// log goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_record_at_the_end_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let newest = ten_entries(dir.path()).await;
    // Half a record: a header that promises more bytes than follow.
    let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
    drop(f);
    let size = std::fs::metadata(&newest).unwrap().len();

    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(log.index_range(), Some((1, 10)));
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), size - 10, "the torn bytes are gone");
    append(&mut log, (11..=12).map(blank)).await;
    drop(log);
    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log, 9..=12).await, vec![(1, 9), (1, 10), (1, 11), (1, 12)]);
}

/// A crash can leave the newest segment longer than the data written to it,
/// ending in zeroed bytes (the file's size reached the disk before its
/// data). They hold no acknowledged record: they are cut off, as a torn
/// record is. Zeroes with data after them are damage, refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_tail_is_cut_off_and_zeroes_before_data_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let newest = ten_entries(dir.path()).await;
    let size = std::fs::metadata(&newest).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
    f.write_all(&[0; 4096]).unwrap();
    drop(f);

    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(log.index_range(), Some((1, 10)));
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), size, "the zeroes are gone");
    append(&mut log, (11..=12).map(blank)).await;
    drop(log);
    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(indexes(&mut log, 10..=12).await, vec![(1, 10), (1, 11), (1, 12)]);
    drop(log);

    // Zeroes, then more bytes: not a cut write.
    let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
    f.write_all(&[0; 16]).unwrap();
    f.write_all(&[1]).unwrap();
    drop(f);
    let err = WalLogStore::<TypeConfig>::open(dir.path()).expect_err("zeroes before data opened").to_string();
    assert!(
        err.contains("is damaged at byte") && err.contains("an empty record (zeroed bytes) before more data"),
        "{err}"
    );
}

/// A damaged record anywhere but the end of the newest segment is not a
/// torn write: opening fails and names the segment and the offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_inside_an_older_segment_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        append(&mut log, (1..=10).map(blank)).await;
        log.segment_paths()[0].clone()
    };
    // Reopened, so `first` is no longer the newest segment.
    drop(WalLogStore::<TypeConfig>::open(dir.path()).unwrap());
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0xff;
    std::fs::write(&first, &bytes).unwrap();

    let err = WalLogStore::<TypeConfig>::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{msg}");
    assert!(msg.contains(&first.display().to_string()) && msg.contains("checksum"), "{msg}");
}

/// Full segments are closed and new ones begun; a purge deletes every
/// segment whose entries are all purged, and the vote written in a deleted
/// segment survives (each segment begins with the state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_segments_rotate_and_purged_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new(4, 1);
    {
        let mut log = WalLogStore::<TypeConfig>::open_with(dir.path(), 300).unwrap();
        log.save_vote(&vote).await.unwrap();
        for i in 1..=200 {
            append(&mut log, [blank(i)]).await;
        }
        let before = log.segment_paths();
        assert!(before.len() >= 5, "200 entries in 300-byte segments: {} segments", before.len());
        log.purge(log_id(1, 150)).await.unwrap();
        // Deleted on the flusher thread, after the purge is synced: a sync
        // queued behind it has seen the deletion done.
        log.save_vote(&vote).await.unwrap();
        let after = log.segment_paths();
        assert!(after.len() < before.len(), "{} segments before the purge, {} after", before.len(), after.len());
        let on_disk = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(on_disk, after.len(), "deleted from disk, not only forgotten");
        assert_eq!(log.index_range(), Some((151, 200)));
    }
    let mut log = WalLogStore::<TypeConfig>::open_with(dir.path(), 300).unwrap();
    assert_eq!(log.index_range(), Some((151, 200)));
    assert_eq!(log.purged(), Some(log_id(1, 150)));
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(indexes(&mut log, 150..=152).await, vec![(1, 151), (1, 152)]);
}

/// A data directory written by a version that kept the Raft log in sled
/// is refused by name: its commands applied under other rules. An empty
/// old tree is dropped and the directory opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_sled_log_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(2, 1);
    {
        // The old layout: entries under b'e' + big-endian index, the pointers under m/.
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("raft-log").unwrap();
        for i in 6..=20u64 {
            let mut key = vec![b'e'];
            key.extend_from_slice(&i.to_be_bytes());
            tree.insert(key, impetus_proto::wire::encode(LOG_ENTRY_VERSION, &blank(i))).unwrap();
        }
        tree.insert(b"m/vote", impetus_proto::wire::encode(LOG_META_VERSION, &vote)).unwrap();
        db.flush().unwrap();
    }
    let err = open_stores::<TypeConfig>(dir.path()).await.expect_err("an old sled log opened").to_string();
    assert!(err.contains("older version of impetus (a log kept in sled)") && err.contains("one build"), "{err}");
    assert!(!dir.path().join(WAL_DIR).exists(), "nothing was moved");

    wait_for_unlock(dir.path()).await;
    {
        let db = sled::open(dir.path()).unwrap();
        db.drop_tree("raft-log").unwrap();
        db.open_tree("raft-log").unwrap();
        db.flush().unwrap();
    }
    wait_for_unlock(dir.path()).await;
    let (log, _sm) = open_stores::<TypeConfig>(dir.path()).await.unwrap();
    assert_eq!(log.index_range(), None, "an empty old tree is dropped; the WAL is new");
    drop((log, _sm));
    wait_for_unlock(dir.path()).await;
    let db = sled::open(dir.path()).unwrap();
    assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"raft-log"), "the empty old tree is dropped");
}

/// sled releases its directory lock a moment after the last handle drops.
async fn wait_for_unlock(dir: &Path) {
    for _ in 0..250 {
        match sled::open(dir) {
            Ok(db) => {
                drop(db);
                return;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    panic!("sled kept {} locked for 5 s", dir.display());
}

/// openraft's storage conformance suite, on a fresh WAL each time.
struct Builder;

impl StoreBuilder<TypeConfig, WalLogStore, StateMachineStore<TypeConfig>, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, StateMachineStore<TypeConfig>), StorageError<TypeConfig>> {
        let err = |e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e);
        let dir = tempfile::tempdir().map_err(err)?;
        let log = WalLogStore::open(dir.path()).map_err(err)?;
        let sm = StateMachineStore::open(SnapshotStore::Memory(MemSnapshotStore::new())).map_err(err)?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}

/// A crash can cut the newest segment at any byte: every cut opens, keeps
/// exactly the entries whose records lie wholly before it (a prefix of the
/// log), and the log takes appends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_at_any_byte_of_the_newest_segment_keeps_the_whole_records_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let newest = {
        let mut log = WalLogStore::<TypeConfig>::open(&src).unwrap();
        for i in 1..=20 {
            append(&mut log, [blank(i)]).await;
        }
        log.segment_paths().pop().unwrap()
    };
    let bytes = std::fs::read(&newest).unwrap();
    let name = newest.file_name().unwrap().to_owned();
    let mut kept_before = 0;
    for cut in 0..=bytes.len() {
        let copy = dir.path().join(format!("cut-{cut}"));
        std::fs::create_dir(&copy).unwrap();
        std::fs::write(copy.join(&name), &bytes[..cut]).unwrap();
        let mut log = WalLogStore::<TypeConfig>::open(&copy).unwrap();
        let kept = log.index_range().map_or(0, |(first, last)| {
            assert_eq!(first, 1, "cut at {cut}: the log must start at 1");
            last
        });
        assert!(kept >= kept_before, "cut at {cut} kept {kept} entries, a shorter cut kept {kept_before}");
        kept_before = kept;
        let all: Vec<u64> = (1..=kept).collect();
        let got: Vec<u64> = indexes(&mut log, 1..=20).await.into_iter().map(|(_, i)| i).collect();
        assert_eq!(got, all, "cut at {cut}");
        append(&mut log, [blank(kept + 1)]).await;
        drop(log);
        std::fs::remove_dir_all(&copy).unwrap();
    }
    assert_eq!(kept_before, 20, "the whole segment keeps every entry");
}

/// Segments go oldest first: one whose entries a later truncation replaced
/// stays until every older segment may go too, so a purge never brings a
/// truncated entry back (here: (1,100) after `Truncate{98}` in the next
/// segment, which a purge up to (2,99) alone would have deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_never_resurrects_an_entry_a_truncation_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        append(&mut log, (1..=100).map(blank)).await;
    }
    {
        // A new term's leader replaces 98..=100.
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        log.truncate_after(Some(log_id(1, 97))).await.unwrap();
        append(&mut log, [blank_at(2, 98), blank_at(2, 99)]).await;
    }
    {
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        log.purge(log_id(2, 99)).await.unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap(); // behind the purge's deletions
        assert_eq!(log.segment_paths().len(), 3, "the oldest segment still holds entry 100, so nothing goes");
    }
    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(log.index_range(), None);
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(2, 99)), Some(log_id(2, 99))));
    append(&mut log, [blank_at(2, 100)]).await;
    assert_eq!(indexes(&mut log, 0..=200).await, vec![(2, 100)]);
}

/// In the newest segment, a bad record is cut off only when nothing valid
/// follows it (a cut write); a bad checksum with a valid record after it,
/// or a record whose checksum holds but does not decode, is damage to
/// acknowledged data: opening refuses and says where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_inside_the_newest_segment_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let newest = {
        let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
        for i in 1..=5 {
            append(&mut log, [blank(i)]).await;
        }
        log.segment_paths().pop().unwrap()
    };
    let good = std::fs::read(&newest).unwrap();
    // Record offsets: walk the length fields.
    let mut offsets = Vec::new();
    let mut pos = 0;
    while pos < good.len() {
        offsets.push(pos);
        pos += 8 + u32::from_le_bytes(good[pos..pos + 4].try_into().unwrap()) as usize;
    }
    assert_eq!(offsets.len(), 6, "a meta record and five entries");
    let third_entry = offsets[3];

    // A flipped payload byte in the third entry, two valid entries after it.
    let mut bytes = good.clone();
    bytes[third_entry + 9] ^= 0x55;
    std::fs::write(&newest, &bytes).unwrap();
    let msg = WalLogStore::<TypeConfig>::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains(&format!("damaged at byte {third_entry}")) && msg.contains("a valid record follows"), "{msg}");

    // A record with a correct checksum over bytes that are no record.
    let mut bytes = good[..third_entry].to_vec();
    let junk = [0xffu8; 6];
    bytes.extend_from_slice(&(junk.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&junk).to_le_bytes());
    bytes.extend_from_slice(&junk);
    std::fs::write(&newest, &bytes).unwrap();
    let msg = WalLogStore::<TypeConfig>::open(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("does not decode"), "{msg}");

    // The same flip in the last entry, nothing after it: a cut write.
    let mut bytes = good.clone();
    bytes[offsets[5] + 9] ^= 0x55;
    std::fs::write(&newest, &bytes).unwrap();
    let log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    assert_eq!(log.index_range(), Some((1, 4)));
}

/// Odd ranges read nothing and never panic; files that are not segments
/// (not exactly 16 lowercase hex digits) are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_ranges_and_stray_files_are_harmless() {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("1.wal"), b"not a segment").unwrap();
    std::fs::write(dir.path().join("FFFFFFFFFFFFFFFF.wal"), b"not a segment").unwrap();
    let mut log = WalLogStore::<TypeConfig>::open(dir.path()).unwrap();
    append(&mut log, (1..=5).map(blank)).await;
    let count = |v: Vec<Entry>| v.len();
    assert_eq!(count(log.try_get_log_entries((Excluded(3), Excluded(3))).await.unwrap()), 0);
    assert_eq!(count(log.try_get_log_entries((Excluded(3), Excluded(4))).await.unwrap()), 0);
    assert_eq!(count(log.try_get_log_entries((Excluded(u64::MAX), Unbounded)).await.unwrap()), 0);
    assert_eq!(count(log.try_get_log_entries((Included(4), Excluded(0))).await.unwrap()), 0);
    assert_eq!(count(log.try_get_log_entries((Excluded(2), Included(4))).await.unwrap()), 2);
    assert_eq!(log.segment_paths().len(), 1, "the stray files are not segments");
}

/// A log written by a version whose commands applied differently is
/// refused by name, with the way out, not replayed under other rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_another_version_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let newest = ten_entries(dir.path()).await;
    let oldest = WalLogStore::<TypeConfig>::open(dir.path()).unwrap().segment_paths().remove(0);
    drop(newest);
    // The first record of the oldest segment, rewritten as version 1.
    let mut bytes = std::fs::read(&oldest).unwrap();
    let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    assert_eq!(bytes[8], impetus_raft::wal_log::WAL_RECORD_VERSION);
    bytes[8] = 1;
    let crc = crc32fast::hash(&bytes[8..8 + len]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&oldest, &bytes).unwrap();
    let err = WalLogStore::<TypeConfig>::open(dir.path()).expect_err("an old log opened").to_string();
    assert!(err.contains("written by another version of impetus (log version 1"), "{err}");
    assert!(err.contains("fresh --data-dir"), "{err}");
}
