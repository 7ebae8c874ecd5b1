import { open } from 'node:fs/promises';
import { endianness } from 'node:os';
import { join } from 'node:path';
import type pg from 'pg';
import { BlocksnapError } from '../../proto/errors.js';
import { formatLsn, parseLsn, type PgSqlRow } from './sql-table.js';

/**
 * Proves that a directory this host sees is the data directory of the server
 * the agent is connected to, before a job reads WAL from it or counts on the
 * volume holding it. The path is a claim: configured (`postgres.dataDirectory`,
 * for a server in a container that names its directory otherwise) or the
 * server's own `data_directory`, which for a server on another host (or in
 * another mount namespace) can name a different cluster here — another
 * version's, a stale copy, the primary's beside its standby. Read from such a
 * directory, the image's WAL would belong to another database: an image that
 * never starts, or one that replays the wrong history.
 *
 * The proof: `global/pg_control`'s first fields, read here, equal what the
 * server reports reading from its own pg_control (pg_control_system(),
 * pg_control_checkpoint(), 9.6+) — the system identifier (a cluster and its
 * physical copies share it) and the last checkpoint's LSN (which a copy or a
 * sibling standby does not share for long). A checkpoint landing between the
 * two reads is taken by asking again (3 tries).
 *
 * pg_control's layout, 9.6 through 18, in the server's byte order (this host's:
 * it reads the file the server writes):
 *   0  uint64 system_identifier
 *   8  uint32 pg_control_version
 *   12 uint32 catalog_version_no
 *   16 int32  state, 4 bytes of padding
 *   24 int64  time
 *   32 uint64 checkPoint (LSN of the last checkpoint record)
 * Before 9.6 the server cannot report its pg_control over SQL: nothing is
 * proven, and `proveDataDirectory` says so by returning false.
 */
const CONTROL_PREFIX = 40;

export interface ControlFacts {
  systemIdentifier: string;
  checkpoint: string;
}

export async function readControlFacts(dataDir: string): Promise<ControlFacts> {
  const file = join(dataDir, 'global', 'pg_control');
  let buf: Buffer;
  try {
    const fh = await open(file, 'r');
    try {
      buf = Buffer.alloc(CONTROL_PREFIX);
      const { bytesRead } = await fh.read(buf, 0, CONTROL_PREFIX, 0);
      if (bytesRead < CONTROL_PREFIX) throw new Error(`only ${bytesRead} bytes`);
    } finally {
      await fh.close();
    }
  } catch (e) {
    throw new BlocksnapError('E_CONFIG', `${dataDir} is not a readable PostgreSQL data directory: ${file}: ${(e as Error).message}`, { cause: e });
  }
  const le = endianness() === 'LE';
  const u64 = (at: number) => (le ? buf.readBigUInt64LE(at) : buf.readBigUInt64BE(at));
  return { systemIdentifier: u64(0).toString(), checkpoint: formatLsn(u64(32)) };
}

/** True once proven; false when the server's version cannot report its pg_control; E_CONFIG when the directory is another's. */
export async function proveDataDirectory(client: pg.Client, sql: PgSqlRow, dataDir: string, where: string): Promise<boolean> {
  if (!sql.systemIdentifier || !sql.controlCheckpoint) return false;
  let seen: { here: ControlFacts; server: ControlFacts } | null = null;
  for (let attempt = 0; attempt < 3; attempt++) {
    const server: ControlFacts = {
      systemIdentifier: String((await client.query(sql.systemIdentifier)).rows[0].sysid),
      checkpoint: String((await client.query(sql.controlCheckpoint)).rows[0].lsn),
    };
    const here = await readControlFacts(dataDir);
    if (here.systemIdentifier === server.systemIdentifier && parseLsn(here.checkpoint) === parseLsn(server.checkpoint)) return true;
    seen = { here, server };
    if (here.systemIdentifier !== server.systemIdentifier) break; // no checkpoint changes that
  }
  const { here, server } = seen!;
  throw new BlocksnapError('E_CONFIG',
    `${dataDir} is not the data directory of ${where}: its pg_control says system ${here.systemIdentifier}, last checkpoint ${here.checkpoint}; ` +
    `the server's says system ${server.systemIdentifier}, last checkpoint ${server.checkpoint}` +
    (here.systemIdentifier === server.systemIdentifier ? ' (the same cluster\'s system: a copy, or another node of it)' : ''));
}
