//! Opening a spool: one writer per folder across processes, one reader at a time,
//! recovery that cuts only what a crash can tear, and appends the worker can read.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::ErrorKind;

use comapi_webhook::Error;
use comapi_webhook::store::spool::{Spool, SpoolConfig};
use support::{example_binary, runtime, spool_line, temp_dir};

fn line(id: &str) -> Vec<u8> {
    spool_line(&format!(
        r#"{{"eventId":"{id}","name":"x.y","payload":{{}}}}"#
    ))
}

fn source_kind(error: &Error) -> ErrorKind {
    match error {
        Error::Storage { source, .. } => source.kind(),
        other => panic!("{other:?}"),
    }
}

/// The `requeue` example binary opens the spool: a process of its own.
fn requeue_binary() -> std::path::PathBuf {
    example_binary("requeue")
}

#[test]
fn a_second_open_of_the_same_folder_fails_at_once_here_and_in_another_process() {
    let dir = temp_dir("locked");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let error = Spool::open(&SpoolConfig::new(&dir)).unwrap_err();
        assert_eq!(source_kind(&error), ErrorKind::ResourceBusy);
        assert!(
            error.to_string().contains(&dir.display().to_string()),
            "{error}"
        );

        let other = std::process::Command::new(requeue_binary())
            .env("COMAPI_SPOOL_DIR", &dir)
            .output()
            .unwrap();
        assert_eq!(other.status.code(), Some(1), "{other:?}");
        let stderr = String::from_utf8_lossy(&other.stderr);
        assert!(stderr.contains("is open in another process"), "{stderr}");
        assert!(stderr.contains(&dir.display().to_string()), "{stderr}");

        // Closed, the folder is free again, at once.
        spool.close().await;
        let (again, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        again.close().await;
        let other = std::process::Command::new(requeue_binary())
            .env("COMAPI_SPOOL_DIR", &dir)
            .output()
            .unwrap();
        assert!(other.status.success(), "{other:?}");
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_zero_byte_mid_segment_keeps_the_lines_after_it() {
    let dir = temp_dir("zero-mid");
    let mut damaged = line("z-2");
    damaged[10] = 0;
    // Whole lines, one damaged with a zero byte, then a preallocated zero tail.
    let data = [line("z-1"), damaged.clone(), line("z-3"), vec![0; 4096]].concat();
    let segment = dir.join("segment-0000000001.jsonl");
    std::fs::write(&segment, &data).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(recovery.events, 3);
        assert_eq!(recovery.torn_bytes, 0, "only the zero tail was cut");
        spool.close().await;
        support::record_all(&spool, &seen).await;
    });
    assert_eq!(std::fs::read(&segment).unwrap(), data[..data.len() - 4096]);
    assert_eq!(seen.into_inner().unwrap(), ["z-1", "z-3"]);
    assert_eq!(std::fs::read(dir.join("rejected.jsonl")).unwrap(), damaged);

    // A torn last line (no line end) before the zeros is cut, and only it.
    let torn = [line("t-1"), b"{\"receivedAt\":\"20".to_vec(), vec![0; 100]].concat();
    std::fs::write(dir.join("segment-0000000002.jsonl"), &torn).unwrap();
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(recovery.torn_bytes, 17);
        assert_eq!(recovery.events, 4);
        spool.close().await;
    });
    assert_eq!(
        std::fs::read(dir.join("segment-0000000002.jsonl")).unwrap(),
        line("t-1")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn append_takes_only_records_the_worker_can_read() {
    let dir = temp_dir("append-check");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let refused = [
            (
                b"{\"something\":\"else\"}\n".to_vec(),
                1,
                "line 1 is not a spool record",
            ),
            (
                spool_line(r#"{"name":"x.y"}"#),
                1,
                "missing field `eventId`",
            ),
            (
                spool_line(r#"[{"eventId":"a","name":"x.y"}]"#),
                1,
                "line 1 is not a spool record",
            ),
            (
                [line("a"), b"not json\n".to_vec()].concat(),
                2,
                "line 2 is not a spool record",
            ),
            ([line("a"), line("b")].concat(), 1, "2 lines, but 1 events"),
            (Vec::new(), 1, "no lines, but 1 events"),
        ];
        for (lines, events, why) in refused {
            let error = spool.append(lines, events).await.unwrap_err();
            assert_eq!(source_kind(&error), ErrorKind::InvalidInput);
            assert!(
                error.report().to_string().contains(why),
                "{}",
                error.report()
            );
        }
        assert_eq!(spool.stored(), 0, "nothing of them stored");
        spool
            .append([line("a"), line("b")].concat(), 2)
            .await
            .unwrap();
        spool.append(Vec::new(), 0).await.unwrap();
        assert_eq!(spool.stored(), 2);
        spool.close().await;
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_new_spool_folder_is_created_with_its_parents() {
    let root = temp_dir("nested");
    let dir = root.join("a").join("b").join("spool");
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(recovery.events, 0);
        spool.append(line("n-1"), 1).await.unwrap();
        spool.close().await;
    });
    assert!(dir.join("segment-0000000001.jsonl").exists());
    let _ = std::fs::remove_dir_all(root);
}
