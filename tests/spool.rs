//! The durable spool on real files: group commit, roll-over, torn-line repair,
//! resuming readers, and the receive step's answers around it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
use support::{runtime, spool_line, temp_dir};

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use comapi_webhook::store::spool::{Position, Spool, SpoolConfig};
use comapi_webhook::worker::{EventHandler, HandlerError, RetryPolicy, run_worker};
use comapi_webhook::{Decision, Error, Event, Gate, Inbox, SIGNATURE_HEADER, Verifier};

fn line(id: &str) -> Vec<u8> {
    spool_line(&format!(
        "{{\"eventId\":\"{id}\",\"name\":\"message.sent\",\"payload\":{{\"id\":\"m-{id}\"}},\"revision\":1}}"
    ))
}

/// The segment files in `dir`, in order.
fn segment_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    names.sort();
    names
}

async fn read_all(spool: &Spool) -> Vec<String> {
    let mut reader = spool.reader().unwrap();
    let mut ids = Vec::new();
    while reader.position() < spool.committed() {
        for spooled in reader.next_batch(300).await.unwrap().unwrap() {
            ids.push(spooled.event().unwrap().event_id().to_owned());
        }
    }
    ids
}

#[test]
fn concurrent_appends_share_syncs_and_all_land() {
    let dir = temp_dir("group");
    concurrent_appends_all_land(SpoolConfig::new(dir.to_path_buf()));
}

#[test]
fn without_a_group_linger_concurrent_appends_all_land_too() {
    let dir = temp_dir("group-no-linger");
    let config = SpoolConfig::new(dir.to_path_buf()).with_group_linger(Duration::ZERO);
    assert_eq!(config.group_linger, Duration::ZERO);
    concurrent_appends_all_land(config);
}

fn concurrent_appends_all_land(config: SpoolConfig) {
    let dir = config.dir.clone();
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&config).unwrap();
        assert_eq!((recovery.events, recovery.torn_bytes), (0, 0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..500 {
            let spool = spool.clone();
            tasks.spawn(async move { spool.append(line(&format!("g-{i}")), 1).await });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap().unwrap();
        }
        assert_eq!(spool.stored(), 500);
        let mut ids = read_all(&spool).await;
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 500);
        spool.close().await;
        assert!(
            spool.append(line("late"), 1).await.is_err(),
            "appends after close fail"
        );
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn segments_roll_over_and_readers_cross_them_in_order() {
    let dir = temp_dir("roll");
    runtime().block_on(async {
        let config = SpoolConfig::new(&dir).with_segment_bytes(1000);
        let (spool, _) = Spool::open(&config).unwrap();
        for i in 0..40 {
            spool.append(line(&format!("r-{i:02}")), 1).await.unwrap();
        }
        assert!(segment_names(&dir).len() > 5, "rolled over");
        for n in 1..=5 {
            let closed = std::fs::read(dir.join(format!("segment-{n:010}.jsonl"))).unwrap();
            assert!(
                closed.ends_with(b"\n") && !closed.contains(&0),
                "segment {n} cut clean"
            );
        }
        let ids = read_all(&spool).await;
        let want: Vec<String> = (0..40).map(|i| format!("r-{i:02}")).collect();
        assert_eq!(ids, want);
        spool.close().await;
        // Reopened, it counts what is there.
        let (reopened, recovery) = Spool::open(&config).unwrap();
        assert_eq!((recovery.events, reopened.stored()), (40, 40));
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_torn_last_line_is_cut_and_never_served() {
    let dir = temp_dir("torn");
    let config = SpoolConfig::new(&dir);
    runtime().block_on(async {
        let (spool, _) = Spool::open(&config).unwrap();
        spool
            .append([line("t-1"), line("t-2")].concat(), 2)
            .await
            .unwrap();
        spool.close().await;
    });
    // A crash in the middle of writing the next line.
    let segment = dir.join("segment-0000000001.jsonl");
    let torn = &line("t-3")[..40];
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(torn)
        .unwrap();
    runtime().block_on(async {
        let (spool, recovery) = Spool::open(&config).unwrap();
        assert_eq!((recovery.events, recovery.torn_bytes), (2, 40));
        assert_eq!(read_all(&spool).await, ["t-1", "t-2"]);
        spool.append(line("t-4"), 1).await.unwrap();
        assert_eq!(read_all(&spool).await, ["t-1", "t-2", "t-4"]);
        spool.close().await;
    });
    let text = std::fs::read_to_string(&segment).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.ends_with('\n'));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn readers_resume_from_the_acknowledged_offset() {
    let dir = temp_dir("resume");
    let config = SpoolConfig::new(&dir);
    runtime().block_on(async {
        let (spool, _) = Spool::open(&config).unwrap();
        for i in 0..10 {
            spool.append(line(&format!("o-{i}")), 1).await.unwrap();
        }
        let mut reader = spool.reader().unwrap();
        let batch = reader.next_batch(1).await.unwrap().unwrap();
        assert_eq!(
            batch.len(),
            1,
            "a line longer than the budget is still read whole"
        );
        reader.acknowledge(batch[0].end()).unwrap();
        let second = reader.next_batch(usize::MAX).await.unwrap().unwrap();
        assert_eq!(second.len(), 9);
        // Not acknowledged: a new reader starts after the first event only. The
        // offset belongs to one reader at a time.
        let busy = spool.reader().unwrap_err();
        let Error::Storage { source, .. } = &busy else {
            panic!("{busy:?}");
        };
        assert_eq!(source.kind(), std::io::ErrorKind::ResourceBusy);
        drop(reader);
        let mut again = spool.reader().unwrap();
        assert_eq!(again.position(), batch[0].end());
        let rest = again.next_batch(usize::MAX).await.unwrap().unwrap();
        assert_eq!(rest[0].event().unwrap().event_id(), "o-1");
        assert_eq!(rest[0].secret_index().unwrap(), 0);
        assert_eq!(rest[0].received_at().unwrap(), "2026-01-01T00:00:00.000Z");
        again.acknowledge(rest[8].end()).unwrap();
        drop(again);
        assert_eq!(
            spool.reader().unwrap().position(),
            Position {
                segment: 1,
                offset: spool.committed().offset
            }
        );
        // Closing ends every reader once it has read everything.
        spool.close().await;
        assert!(
            spool
                .reader()
                .unwrap()
                .next_batch(100)
                .await
                .unwrap()
                .is_none()
        );
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_receive_step_answers_503_when_storing_fails() {
    let dir = temp_dir("closed");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let verifier = Verifier::new("a-comapi-webhook-secret-of-36-chars!").unwrap();
        let inbox = Inbox::new(verifier.clone(), spool.clone()).with_max_body_bytes(10_000);
        let body = br#"{"eventId":"s-1","name":"message.sent","payload":{"id":"m"}}"#;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            SIGNATURE_HEADER,
            verifier.sign(body).to_string().parse().unwrap(),
        );
        let reply = inbox.receive(&headers, body).await;
        assert_eq!((reply.status().as_u16(), reply.events()), (200, 1));
        assert!(
            inbox
                .status_page()
                .await
                .body()
                .contains("Events stored: <strong>1</strong>")
        );

        let mut long = http::HeaderMap::new();
        long.insert(http::header::CONTENT_LENGTH, "10001".parse().unwrap());
        assert_eq!(
            inbox.check_content_length(&long).unwrap().status().as_u16(),
            413
        );
        assert_eq!(
            inbox
                .receive(&headers, &[b' '; 10_001])
                .await
                .status()
                .as_u16(),
            413
        );

        spool.close().await;
        let reply = inbox.receive(&headers, body).await;
        assert_eq!((reply.status().as_u16(), reply.events()), (503, 0));
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lines_in_another_key_order_still_read() {
    let dir = temp_dir("order");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let other = "{\"event\":{\"eventId\":\"k-1\",\"name\":\"x.y\",\"payload\":{}},\"secretIndex\":2,\"receivedAt\":\"then\"}\n";
        spool.append([other.as_bytes().to_vec(), line("k-2")].concat(), 2).await.unwrap();
        let mut reader = spool.reader().unwrap();
        let batch = reader.next_batch(usize::MAX).await.unwrap().unwrap();
        assert_eq!(batch[0].event().unwrap().event_id(), "k-1");
        assert_eq!((batch[0].secret_index().unwrap(), batch[0].received_at().unwrap()), (2, "then".to_owned()));
        assert_eq!(batch[1].event().unwrap().event_id(), "k-2");
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stored_line_that_is_not_one_envelope_is_a_storage_error_for_that_event_only() {
    let dir = temp_dir("not-one");
    let batch = spool_line(r#"[{"eventId":"b-1","name":"x.y","payload":{}}]"#);
    let numeric_id = spool_line(r#"{"eventId":7,"name":"message.sent","payload":{"id":"m"}}"#);
    let lines = [batch, numeric_id, line("ok-1")].concat();
    // `append` refuses such lines, so they can only be damage on disk.
    std::fs::write(dir.join("segment-0000000001.jsonl"), &lines).unwrap();
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let refused = spool.append(lines, 3).await.unwrap_err();
        assert!(
            refused
                .report()
                .to_string()
                .contains("line 1 is not a spool record"),
            "{}",
            refused.report()
        );
        let mut reader = spool.reader().unwrap();
        let read = reader.next_batch(usize::MAX).await.unwrap().unwrap();
        for bad in &read[..2] {
            let error = bad.event().unwrap_err();
            let Error::Storage { source, .. } = &error else {
                panic!("{error:?}");
            };
            // The cause is kept: what serde_json said, as data that is not valid.
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
            assert!(
                error.to_string().contains("corrupt event in the spool"),
                "{error}"
            );
        }
        assert_eq!(read[2].event().unwrap().event_id(), "ok-1");
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// What `run_worker` handed out: each event's id and decision, and each line it
/// set aside with its error.
#[derive(Default)]
struct Worked {
    events: Mutex<Vec<(String, Decision)>>,
    /// Each line set aside, with its error as `Debug` shows it.
    set_aside: Mutex<Vec<(Vec<u8>, String)>>,
}

impl EventHandler for &Worked {
    async fn handle(&self, event: Event<'static>) -> Result<(), HandlerError> {
        let id = event.event_id().to_owned();
        self.events.lock().unwrap().push((id, Decision::Fresh));
        Ok(())
    }

    fn skipped(&self, event: &Event<'_>, decision: Decision) {
        let id = event.event_id().to_owned();
        self.events.lock().unwrap().push((id, decision));
    }

    fn set_aside(&self, line: &[u8], error: &Error) {
        self.set_aside
            .lock()
            .unwrap()
            .push((line.to_vec(), format!("{error:?}")));
    }
}

impl Worked {
    /// Runs the worker over `spool` (closed, so it returns) with `gate`.
    async fn run(spool: &Spool, gate: &Gate) -> Worked {
        let worked = Worked::default();
        run_worker(
            spool.reader().unwrap(),
            gate,
            &worked,
            support::worker_config(RetryPolicy::default()),
        )
        .await
        .unwrap();
        worked
    }

    fn set_aside_lines(&self) -> Vec<Vec<u8>> {
        self.set_aside
            .lock()
            .unwrap()
            .iter()
            .map(|(line, _)| line.clone())
            .collect()
    }
}

#[test]
fn the_worker_sets_aside_a_line_that_is_not_an_event_keeps_it_and_goes_on() {
    let dir = temp_dir("set-aside");
    let numeric_id = spool_line(r#"{"eventId":7,"name":"message.sent","payload":{"id":"m"}}"#);
    let not_a_frame = b"{\"something\":\"else\"}\n".to_vec();
    let gate = Gate::in_memory();
    let lines = [
        line("ok-1"),
        numeric_id.clone(),
        not_a_frame.clone(),
        line("ok-2"),
        line("ok-1"),
    ];
    std::fs::write(dir.join("segment-0000000001.jsonl"), lines.concat()).unwrap();
    let (worked, end) = runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.close().await;
        (Worked::run(&spool, &gate).await, spool.committed())
    });
    assert_eq!(
        *worked.events.lock().unwrap(),
        [
            ("ok-1".to_owned(), Decision::Fresh),
            ("ok-2".to_owned(), Decision::Fresh),
            ("ok-1".to_owned(), Decision::Duplicate),
        ],
        "the lines after the bad ones were processed, in order"
    );
    assert_eq!(
        worked.set_aside_lines(),
        [
            numeric_id.strip_suffix(b"\n").unwrap(),
            not_a_frame.strip_suffix(b"\n").unwrap()
        ]
    );
    for (_, error) in worked.set_aside.lock().unwrap().iter() {
        assert!(error.starts_with("Storage {"), "{error}");
    }
    let rejected = dir.join("rejected.jsonl");
    assert_eq!(
        std::fs::read(&rejected).unwrap(),
        [numeric_id, not_a_frame].concat(),
        "kept byte for byte"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("offset")).unwrap().trim(),
        format!("{} {}", end.segment, end.offset),
        "acknowledged past every line"
    );

    // Reopened (as after a restart), the damaged lines are no reason to cut the
    // segment: every line after them stays. Resumed, the worker has nothing left to
    // do and sets nothing aside again.
    let segment = dir.join("segment-0000000001.jsonl");
    let before = std::fs::read(&segment).unwrap();
    let resumed = runtime().block_on(async {
        let (spool, recovery) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        assert_eq!(recovery.torn_bytes, 0);
        spool.close().await;
        assert_eq!(std::fs::read(&segment).unwrap(), before);
        Worked::run(&spool, &gate).await
    });
    assert!(
        resumed.events.lock().unwrap().is_empty() && resumed.set_aside.lock().unwrap().is_empty()
    );
    assert_eq!(
        std::fs::read(&rejected)
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        2
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_finished_segment_that_lost_its_last_line_end_does_not_stop_the_worker() {
    let dir = temp_dir("unended-segment");
    let damaged = b"{\"receivedAt\":\"2026-01-01T00:00".to_vec();
    std::fs::write(
        dir.join("segment-0000000001.jsonl"),
        [line("s-1"), damaged.clone()].concat(),
    )
    .unwrap();
    std::fs::write(dir.join("segment-0000000002.jsonl"), line("s-2")).unwrap();
    let worked = runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.close().await;
        Worked::run(&spool, &Gate::in_memory()).await
    });
    let ids: Vec<String> = worked
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(ids, ["s-1", "s-2"]);
    assert_eq!(worked.set_aside_lines(), [damaged]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_reader_offset_past_the_data_is_brought_back_to_it() {
    let dir = temp_dir("offset-past");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool.append(line("o-1"), 1).await.unwrap();
        let mut reader = spool.reader().unwrap();
        let end = reader.next_batch(1 << 20).await.unwrap().unwrap()[0].end();
        // The offset of a reader that had read far more than the segment now holds.
        reader
            .acknowledge(Position {
                offset: end.offset + 10_000,
                ..end
            })
            .unwrap();
        drop(reader);
        let mut reader = spool.reader().unwrap();
        assert_eq!(reader.position(), end, "never past the committed data");
        spool.append(line("o-2"), 1).await.unwrap();
        let next = reader.next_batch(1 << 20).await.unwrap().unwrap();
        assert_eq!(
            next[0].event().unwrap().event_id(),
            "o-2",
            "nothing new skipped"
        );
        spool.close().await;
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn appends_that_would_break_the_segment_are_refused_and_store_nothing() {
    let dir = temp_dir("bad-append");
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        let unended = line("u-1").strip_suffix(b"\n").unwrap().to_vec();
        let mut zero = line("z-1");
        zero[5] = 0;
        for bad in [unended, zero] {
            let error = spool.append(bad, 1).await.unwrap_err();
            let Error::Storage { source, .. } = &error else {
                panic!("{error:?}");
            };
            assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
            assert!(
                error
                    .report()
                    .to_string()
                    .contains("must end in a line feed and hold no zero byte"),
                "{}",
                error.report()
            );
        }
        spool.append(Vec::new(), 0).await.unwrap();
        spool.append(line("ok-1"), 1).await.unwrap();
        assert_eq!(spool.stored(), 1);
        assert_eq!(read_all(&spool).await, ["ok-1"]);
        spool.close().await;
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_plain_function_or_typed_closure_is_an_event_handler() {
    let dir = temp_dir("fn-handler");
    let seen = Mutex::new(Vec::new());
    runtime().block_on(async {
        let (spool, _) = Spool::open(&SpoolConfig::new(&dir)).unwrap();
        spool
            .append([line("f-1"), line("f-2")].concat(), 2)
            .await
            .unwrap();
        spool.close().await;
        support::record_all(&spool, &seen).await;
    });
    assert_eq!(seen.into_inner().unwrap(), ["f-1", "f-2"]);
    assert!(!dir.join("rejected.jsonl").exists(), "nothing set aside");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_live_segment_is_preallocated_and_cut_clean_on_close_or_after_a_crash() {
    let dir = temp_dir("prealloc");
    let copy = temp_dir("prealloc-crash");
    let segment = |dir: &std::path::Path| dir.join("segment-0000000001.jsonl");
    let data = [line("p-1"), line("p-2"), line("p-3")].concat();
    runtime().block_on(async {
        let config = SpoolConfig::new(&dir).with_preallocate_bytes(4096);
        let (spool, _) = Spool::open(&config).unwrap();
        spool.append(line("p-1"), 1).await.unwrap();
        spool
            .append([line("p-2"), line("p-3")].concat(), 2)
            .await
            .unwrap();
        let live = std::fs::read(segment(&dir)).unwrap();
        assert_eq!(
            live.len(),
            line("p-1").len() + 4096,
            "filled ahead of the first write"
        );
        assert_eq!(&live[..data.len()], &data[..]);
        assert!(live[data.len()..].iter().all(|&b| b == 0));

        // What a crash leaves behind: the data and the zero tail, nothing torn.
        std::fs::write(segment(&copy), &live).unwrap();
        let (recovered, recovery) = Spool::open(&SpoolConfig::new(&copy)).unwrap();
        assert_eq!((recovery.events, recovery.torn_bytes), (3, 0));
        assert_eq!(std::fs::read(segment(&copy)).unwrap(), data, "zeros cut");
        assert_eq!(read_all(&recovered).await, ["p-1", "p-2", "p-3"]);
        recovered.close().await;

        spool.close().await;
        assert_eq!(
            std::fs::read(segment(&dir)).unwrap(),
            data,
            "zeros cut on close"
        );
    });
    // A line torn inside the zero tail: only the torn bytes count as torn.
    let torn = &line("p-4")[..50];
    let mut crashed = [&data[..], torn].concat();
    crashed.resize(crashed.len() + 1000, 0);
    std::fs::write(segment(&copy), &crashed).unwrap();
    runtime().block_on(async {
        let (recovered, recovery) = Spool::open(&SpoolConfig::new(&copy)).unwrap();
        assert_eq!((recovery.events, recovery.torn_bytes), (3, 50));
        assert_eq!(read_all(&recovered).await, ["p-1", "p-2", "p-3"]);
        recovered.append(line("p-5"), 1).await.unwrap();
        assert_eq!(read_all(&recovered).await, ["p-1", "p-2", "p-3", "p-5"]);
    });
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(copy);
}

#[test]
fn without_preallocation_a_live_segment_holds_only_data() {
    let dir = temp_dir("no-prealloc");
    runtime().block_on(async {
        let config = SpoolConfig::new(&dir).with_preallocate_bytes(0);
        let (spool, _) = Spool::open(&config).unwrap();
        spool.append(line("n-1"), 1).await.unwrap();
        let live = std::fs::read(dir.join("segment-0000000001.jsonl")).unwrap();
        assert_eq!(live, line("n-1"));
    });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn processed_segments_are_removed_only_when_asked_and_only_after_the_offset_is_saved() {
    for remove in [false, true] {
        let dir = temp_dir(&format!("remove-{remove}"));
        runtime().block_on(async {
            let config = SpoolConfig::new(&dir)
                .with_segment_bytes(400)
                .with_remove_processed(remove);
            let (spool, _) = Spool::open(&config).unwrap();
            for i in 0..20 {
                spool.append(line(&format!("x-{i:02}")), 1).await.unwrap();
            }
            let before = segment_names(&dir);
            assert!(before.len() > 3, "rolled over: {before:?}");
            // Read all but the last few events, then acknowledge there.
            let mut reader = spool.reader().unwrap();
            let mut seen = Vec::new();
            while seen.len() < 15 {
                seen.extend(reader.next_batch(1).await.unwrap().unwrap());
            }
            let upto = seen[14].end();
            reader.acknowledge(upto).unwrap();
            let after = segment_names(&dir);
            if remove {
                let first_kept = format!("segment-{:010}.jsonl", upto.segment);
                assert_eq!(after.first(), Some(&first_kept), "{after:?}");
                assert!(after.len() < before.len());
            } else {
                assert_eq!(after, before);
            }
            spool.close().await;
            // A restart resumes at the offset and reads every event after it.
            let (reopened, _) = Spool::open(&config).unwrap();
            let want: Vec<String> = (15..20).map(|i| format!("x-{i:02}")).collect();
            assert_eq!(read_all(&reopened).await, want);
        });
        let _ = std::fs::remove_dir_all(dir);
    }
}
