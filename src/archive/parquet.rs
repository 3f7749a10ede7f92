//! The Parquet files of the archive: their schemas, how a file is written, and how its
//! records and footer are read back (by `reconcile` and by resuming archivers).
//!
//! Columns use plain Parquet types (INT32/INT64/UINT64/UTF8, times as epoch ms) so any
//! reader (DuckDB, Polars, Spark) takes them as they are. `record_time_ms` is the record
//! time the dataflow uses: the log's, made monotone per partition by a running max.

use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, Int64Builder, StringBuilder, UInt64Builder};
use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::ColumnPath;

use super::ArchiveError;
use crate::record::{ClickEvent, FraudVerdict, impression_hex, parse_impression_hex};
use crate::time::Millis;

/// A click as archived: the log record's place and time, and the event as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedClick {
    /// The log partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Record time (monotone per partition).
    pub record_time_ms: Millis,
    /// The event as the tracker logged it (event time not clamped).
    pub event: ClickEvent,
}

/// A fraud verdict as archived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedVerdict {
    /// The log partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Record time (monotone per partition).
    pub record_time_ms: Millis,
    /// The verdict.
    pub verdict: FraudVerdict,
}

/// The range of a file, from its footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// The offset after the file's last record: where the next file starts.
    pub next_offset: u64,
    /// The running max of record times at `next_offset`.
    pub time_floor_ms: Millis,
    /// Records in the file.
    pub records: u64,
}

const NEXT_OFFSET: &str = "clickagg.next_offset";
const TIME_FLOOR: &str = "clickagg.time_floor_ms";

fn err(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Parquet(e.to_string())
}

/// The schema of `clicks/`.
pub fn click_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("record_time_ms", DataType::Int64, false),
        Field::new("impression_id", DataType::Utf8, false),
        Field::new("ad_id", DataType::UInt64, false),
        Field::new("issued_at_ms", DataType::Int64, false),
        Field::new("event_time_ms", DataType::Int64, false),
        Field::new("click_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("ip", DataType::Utf8, false),
        Field::new("cpc_micros", DataType::Int64, false),
    ]))
}

/// The schema of `verdicts/`.
pub fn verdict_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("record_time_ms", DataType::Int64, false),
        Field::new("impression_id", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The rows of one file.
pub enum Rows<'a> {
    /// Clicks.
    Clicks(&'a [ArchivedClick]),
    /// Verdicts.
    Verdicts(&'a [ArchivedVerdict]),
}

/// The most a file's writer holds of the row group it is filling (encoded), before it
/// writes that row group out. With each column's current page and dictionary, an open
/// file holds about 6 MiB in memory (`FileWriter::buffered_bytes`), whatever its length.
pub const ROW_GROUP_BYTES: usize = 2 << 20;

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `clicks/`.
    Clicks,
    /// `verdicts/`.
    Verdicts,
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::Clicks(v) => v.len(),
            Rows::Verdicts(v) => v.len(),
        }
    }
}

/// The rows as one record batch.
fn record_batch(rows: Rows<'_>) -> Result<RecordBatch, ArchiveError> {
    Ok(match rows {
        Rows::Clicks(clicks) => {
            let mut partition = Int32Builder::new();
            let mut offset = Int64Builder::new();
            let mut record_time = Int64Builder::new();
            let mut impression = StringBuilder::new();
            let mut ad = UInt64Builder::new();
            let mut issued = Int64Builder::new();
            let mut event_time = Int64Builder::new();
            let mut click_id = StringBuilder::new();
            let mut user_id = StringBuilder::new();
            let mut ip = StringBuilder::new();
            let mut cpc = Int64Builder::new();
            for c in clicks {
                partition.append_value(c.partition as i32);
                offset.append_value(i64_of(c.offset));
                record_time.append_value(i64_of(c.record_time_ms));
                impression.append_value(impression_hex(c.event.impression_id));
                ad.append_value(c.event.ad_id);
                issued.append_value(i64_of(c.event.issued_at_ms));
                event_time.append_value(i64_of(c.event.event_time_ms));
                click_id.append_value(&c.event.click_id);
                user_id.append_value(&c.event.user_id);
                ip.append_value(c.event.ip.to_string());
                cpc.append_value(i64_of(c.event.cpc_micros));
            }
            let columns: Vec<ArrayRef> = vec![
                Arc::new(partition.finish()),
                Arc::new(offset.finish()),
                Arc::new(record_time.finish()),
                Arc::new(impression.finish()),
                Arc::new(ad.finish()),
                Arc::new(issued.finish()),
                Arc::new(event_time.finish()),
                Arc::new(click_id.finish()),
                Arc::new(user_id.finish()),
                Arc::new(ip.finish()),
                Arc::new(cpc.finish()),
            ];
            RecordBatch::try_new(click_schema(), columns).map_err(err)?
        }
        Rows::Verdicts(verdicts) => {
            let mut partition = Int32Builder::new();
            let mut offset = Int64Builder::new();
            let mut record_time = Int64Builder::new();
            let mut impression = StringBuilder::new();
            let mut reason = StringBuilder::new();
            for v in verdicts {
                partition.append_value(v.partition as i32);
                offset.append_value(i64_of(v.offset));
                record_time.append_value(i64_of(v.record_time_ms));
                impression.append_value(impression_hex(v.verdict.impression_id));
                reason.append_value(&v.verdict.reason);
            }
            let columns: Vec<ArrayRef> = vec![
                Arc::new(partition.finish()),
                Arc::new(offset.finish()),
                Arc::new(record_time.finish()),
                Arc::new(impression.finish()),
                Arc::new(reason.finish()),
            ];
            RecordBatch::try_new(verdict_schema(), columns).map_err(err)?
        }
    })
}

/// A file being written: rows go into row groups as they come, and a row group is written
/// to the sink once it reaches [`ROW_GROUP_BYTES`], so memory does not grow with the file.
/// The range the file covers goes into its footer at [`FileWriter::finish`].
pub struct FileWriter<W: Write + Send> {
    writer: ArrowWriter<W>,
}

impl<W: Write + Send> FileWriter<W> {
    /// A file of `kind` written to `sink`.
    pub fn new(sink: W, kind: FileKind) -> Result<FileWriter<W>, ArchiveError> {
        let schema = match kind {
            FileKind::Clicks => click_schema(),
            FileKind::Verdicts => verdict_schema(),
        };
        // Impression and click ids are unique per click: a dictionary of them would only
        // grow (to its 1 MiB limit per column, held in memory) before falling back.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .set_column_dictionary_enabled(ColumnPath::from("impression_id"), false)
            .set_column_dictionary_enabled(ColumnPath::from("click_id"), false)
            .build();
        let writer = ArrowWriter::try_new(sink, schema, Some(props)).map_err(err)?;
        Ok(FileWriter { writer })
    }

    /// Bytes the writer holds in memory: the row group it is filling, encoded.
    pub fn buffered_bytes(&self) -> usize {
        self.writer.memory_size()
    }

    /// Appends rows of the file's kind.
    pub fn write(&mut self, rows: Rows<'_>) -> Result<(), ArchiveError> {
        if rows.len() == 0 {
            return Ok(());
        }
        let batch = record_batch(rows)?;
        self.writer.write(&batch).map_err(err)
    }

    /// Writes the last row group and the footer with the range the file covers, and
    /// returns the sink.
    pub fn finish(mut self, footer: Footer) -> Result<W, ArchiveError> {
        self.writer.append_key_value_metadata(KeyValue::new(
            NEXT_OFFSET.to_owned(),
            footer.next_offset.to_string(),
        ));
        self.writer.append_key_value_metadata(KeyValue::new(
            TIME_FLOOR.to_owned(),
            footer.time_floor_ms.to_string(),
        ));
        self.writer.into_inner().map_err(err)
    }
}

/// Reads the range a file covers from its footer.
pub fn footer(bytes: Bytes) -> Result<Footer, ArchiveError> {
    let reader = SerializedFileReader::new(bytes).map_err(err)?;
    let meta = reader.metadata().file_metadata();
    let get = |key: &str| -> Result<u64, ArchiveError> {
        meta.key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == key))
            .and_then(|k| k.value.as_deref())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| err(format!("file has no {key} in its footer")))
    };
    Ok(Footer {
        next_offset: get(NEXT_OFFSET)?,
        time_floor_ms: get(TIME_FLOOR)?,
        records: u64::try_from(meta.num_rows()).unwrap_or(0),
    })
}

fn column<'a, T: Array + 'static>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a T, ArchiveError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| err(format!("column {name} missing or of the wrong type")))
}

fn batches(bytes: Bytes) -> Result<Vec<RecordBatch>, ArchiveError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(err)?
        .with_batch_size(65_536)
        .build()
        .map_err(err)?;
    reader.collect::<Result<Vec<_>, _>>().map_err(err)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The clicks of a `clicks/` file.
pub fn read_clicks(bytes: Bytes) -> Result<Vec<ArchivedClick>, ArchiveError> {
    let mut out = Vec::new();
    for b in batches(bytes)? {
        let partition = column::<Int32Array>(&b, "partition")?;
        let offset = column::<Int64Array>(&b, "offset")?;
        let record_time = column::<Int64Array>(&b, "record_time_ms")?;
        let impression = column::<StringArray>(&b, "impression_id")?;
        let ad = column::<UInt64Array>(&b, "ad_id")?;
        let issued = column::<Int64Array>(&b, "issued_at_ms")?;
        let event_time = column::<Int64Array>(&b, "event_time_ms")?;
        let click_id = column::<StringArray>(&b, "click_id")?;
        let user_id = column::<StringArray>(&b, "user_id")?;
        let ip = column::<StringArray>(&b, "ip")?;
        let cpc = column::<Int64Array>(&b, "cpc_micros")?;
        for i in 0..b.num_rows() {
            out.push(ArchivedClick {
                partition: partition.value(i) as u32,
                offset: u64_of(offset.value(i)),
                record_time_ms: u64_of(record_time.value(i)),
                event: ClickEvent {
                    impression_id: parse_impression_hex(impression.value(i))
                        .ok_or_else(|| err("bad impression_id"))?,
                    ad_id: ad.value(i),
                    issued_at_ms: u64_of(issued.value(i)),
                    event_time_ms: u64_of(event_time.value(i)),
                    click_id: click_id.value(i).to_owned(),
                    user_id: user_id.value(i).to_owned(),
                    ip: ip.value(i).parse().map_err(err)?,
                    cpc_micros: u64_of(cpc.value(i)),
                },
            });
        }
    }
    Ok(out)
}

/// The verdicts of a `verdicts/` file.
pub fn read_verdicts(bytes: Bytes) -> Result<Vec<ArchivedVerdict>, ArchiveError> {
    let mut out = Vec::new();
    for b in batches(bytes)? {
        let partition = column::<Int32Array>(&b, "partition")?;
        let offset = column::<Int64Array>(&b, "offset")?;
        let record_time = column::<Int64Array>(&b, "record_time_ms")?;
        let impression = column::<StringArray>(&b, "impression_id")?;
        let reason = column::<StringArray>(&b, "reason")?;
        for i in 0..b.num_rows() {
            out.push(ArchivedVerdict {
                partition: partition.value(i) as u32,
                offset: u64_of(offset.value(i)),
                record_time_ms: u64_of(record_time.value(i)),
                verdict: FraudVerdict {
                    impression_id: parse_impression_hex(impression.value(i))
                        .ok_or_else(|| err("bad impression_id"))?,
                    reason: reason.value(i).to_owned(),
                },
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_round_trip_with_footer() {
        let c = ArchivedClick {
            partition: 2,
            offset: 17,
            record_time_ms: 1_764_000_000_000,
            event: ClickEvent {
                impression_id: 0xabc,
                ad_id: u64::MAX,
                issued_at_ms: 1,
                event_time_ms: 2,
                click_id: "c".into(),
                user_id: "u".into(),
                ip: "2001:db8::1".parse().expect("ip"),
                cpc_micros: 5,
            },
        };
        let footer = Footer {
            next_offset: 18,
            time_floor_ms: 1_764_000_000_000,
            records: 1,
        };
        let mut file = FileWriter::new(Vec::new(), FileKind::Clicks).expect("writer");
        file.write(Rows::Clicks(std::slice::from_ref(&c)))
            .expect("write");
        let bytes = Bytes::from(file.finish(footer).expect("finish"));
        assert_eq!(self::footer(bytes.clone()).expect("footer"), footer);
        assert_eq!(read_clicks(bytes).expect("reads"), vec![c]);
    }

    fn click(i: u64) -> ArchivedClick {
        ArchivedClick {
            partition: 0,
            offset: i,
            record_time_ms: 1_764_000_000_000 + i,
            event: ClickEvent {
                impression_id: u128::from(i) * 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834,
                ad_id: i % 977,
                issued_at_ms: 1_764_000_000_000,
                event_time_ms: 1_764_000_000_000 + i,
                click_id: format!("click-{i:016x}"),
                user_id: format!("user-{}", i % 50_000),
                ip: std::net::IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                cpc_micros: 1_000 + i % 7,
            },
        }
    }

    #[test]
    fn a_long_file_is_written_in_row_groups_and_holds_one_in_memory() {
        let clicks: Vec<ArchivedClick> = (0..400_000).map(click).collect();
        let mut file = FileWriter::new(Vec::new(), FileKind::Clicks).expect("writer");
        let mut most_held = 0;
        for chunk in clicks.chunks(4096) {
            file.write(Rows::Clicks(chunk)).expect("write");
            most_held = most_held.max(file.buffered_bytes());
        }
        let footer = Footer {
            next_offset: 400_000,
            time_floor_ms: 1_764_000_399_999,
            records: 400_000,
        };
        let bytes = Bytes::from(file.finish(footer).expect("finish"));
        let groups = SerializedFileReader::new(bytes.clone())
            .expect("reader")
            .metadata()
            .num_row_groups();
        // Held in one row group, these clicks would take the whole file's size in memory.
        assert!(groups >= 8, "{groups} row groups in {} bytes", bytes.len());
        assert!(
            most_held <= 4 * ROW_GROUP_BYTES && most_held * 4 < bytes.len(),
            "held {most_held} bytes while writing a {}-byte file",
            bytes.len()
        );
        assert_eq!(self::footer(bytes.clone()).expect("footer"), footer);
        assert_eq!(read_clicks(bytes).expect("reads"), clicks);
    }
}
