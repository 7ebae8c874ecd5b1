import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import { proveDataDirectory } from './data-dir-proof.js';
import { parseLsn, pgSqlFor, WAL_SEGMENT_SIZE_SQL, walFileName } from './sql-table.js';

/**
 * The WAL an image of a PRIMARY needs beyond its snapshot. The backup-end
 * record is written by the stop call, after the snapshot, so recovery from
 * the snapshot alone ends with "WAL ends before end of online backup". After
 * the stop, the segments from the backup's start LSN to its stop LSN are read
 * from the live server's WAL directory (the stop call switched segments, so
 * they are complete and not yet recycled) and travel with the image.
 * A standby image needs none: its stop point is at or below what it replayed.
 */
export interface WalFacts {
  dataDirectory: string;
  walDir: string;
  segmentSize: number;
  /** The directory was proven to be the server's (data-dir-proof.ts); false before 9.6, which cannot say. */
  proven: boolean;
}

export interface WalSegment {
  name: string;
  data: Buffer;
}

/**
 * Where the WAL is and how big a segment is, asked once before the freeze (a
 * failure fails the job early); the data directory, configured or the
 * server's answer, is proven to be the server's (E_CONFIG if it is another's).
 */
export async function walFacts(conn: pg.ClientConfig, dataDirectory?: string): Promise<WalFacts> {
  const client = new pg.Client({ ...conn, application_name: 'blocksnap-wal' });
  try {
    await client.connect();
    const r = await client.query(`select current_setting('server_version_num')::int as v, (${WAL_SEGMENT_SIZE_SQL}) as seg`);
    const row = r.rows[0] as { v: number; seg: string };
    let dir = dataDirectory;
    if (!dir) dir = (await client.query(`select current_setting('data_directory') as d`)).rows[0].d as string;
    const sql = pgSqlFor(row.v);
    const proven = await proveDataDirectory(client, sql, dir, `PostgreSQL at ${conn.host ?? 'localhost'}:${conn.port ?? 5432}`);
    return { dataDirectory: dir, walDir: join(dir, sql.walDir), segmentSize: Number(row.seg), proven };
  } catch (e) {
    if (isBlocksnapError(e, 'E_CONFIG')) throw e;
    throw new BlocksnapError('E_PG', `cannot learn where the server keeps its WAL: ${(e as Error).message}`, { cause: e });
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Segment names covering [startLsn, stopLsn] on `timeline`. */
export function segmentsBetween(timeline: number, startLsn: string, stopLsn: string, segmentSize: number): string[] {
  const seg = BigInt(segmentSize);
  const first = parseLsn(startLsn) / seg;
  const last = parseLsn(stopLsn) / seg;
  if (last < first || last - first > 1024n) throw new BlocksnapError('E_PG', `implausible WAL range ${startLsn}..${stopLsn}`);
  const names: string[] = [];
  for (let s = first; s <= last; s++) names.push(walFileName(timeline, s * seg, segmentSize));
  return names;
}

export async function captureWal(facts: WalFacts, timeline: number, startLsn: string, stopLsn: string): Promise<WalSegment[]> {
  const out: WalSegment[] = [];
  for (const name of segmentsBetween(timeline, startLsn, stopLsn, facts.segmentSize)) {
    try {
      const data = await readFile(join(facts.walDir, name));
      if (data.length !== facts.segmentSize) throw new Error(`${data.length} bytes, expected ${facts.segmentSize}`);
      out.push({ name, data });
    } catch (e) {
      throw new BlocksnapError('E_PG', `cannot read WAL segment ${name} from ${facts.walDir}: ${(e as Error).message}`, { cause: e });
    }
  }
  return out;
}
