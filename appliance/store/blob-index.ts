/**
 * Blob index (DESIGN.md §3.2): where each durable blob lives. A cache of the
 * pack trailers: rows go in only after their pack is durable, and the whole
 * index can be rebuilt from the packs (`reindexFromPacks`).
 *
 * blobs(digest BLOB PRIMARY KEY, pack TEXT, offset INTEGER, stored_len
 * INTEGER, plain_len INTEGER, type INTEGER, codec INTEGER) — WITHOUT ROWID so
 * a lookup is a single B-tree descent on the digest.
 * packs(id TEXT PRIMARY KEY, size INTEGER, blobs INTEGER).
 */
import Database from 'better-sqlite3';
import { BlocksnapError } from '../../proto/errors.js';
import type { BlobLocation, BlobType } from './chunk-store.js';
import type { TrailerEntry } from './pack-format.js';
import { listPackFiles, PackReader } from './pack-reader.js';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS blobs (
  digest BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
  stored_len INTEGER NOT NULL, plain_len INTEGER NOT NULL,
  type INTEGER NOT NULL, codec INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs (id TEXT PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL);
`;

type LocRow = [string, number, number, number, number, number];

export interface IndexedPack {
  id: string;
  size: number;
  entries: readonly TrailerEntry[];
}

export class BlobIndex {
  private readonly hasStmt: Database.Statement<[Buffer], number>;
  private readonly locStmt: Database.Statement<[Buffer], LocRow>;
  private readonly insertPackTx: (pack: IndexedPack) => void;

  private constructor(private readonly db: Database.Database) {
    this.hasStmt = db.prepare<[Buffer], number>('SELECT 1 FROM blobs WHERE digest = ?').pluck();
    this.locStmt = db
      .prepare<[Buffer], LocRow>('SELECT pack, offset, stored_len, plain_len, type, codec FROM blobs WHERE digest = ?')
      .raw();
    const insPack = db.prepare('INSERT OR IGNORE INTO packs (id, size, blobs) VALUES (?, ?, ?)');
    // OR IGNORE: across packs the first copy of a blob wins (DESIGN.md §3.1).
    const insBlob = db.prepare(
      'INSERT OR IGNORE INTO blobs (digest, pack, offset, stored_len, plain_len, type, codec) VALUES (?, ?, ?, ?, ?, ?, ?)',
    );
    this.insertPackTx = db.transaction((pack: IndexedPack) => {
      if (insPack.run(pack.id, pack.size, pack.entries.length).changes === 0) return;
      for (const e of pack.entries) {
        insBlob.run(e.digest, pack.id, e.offset, e.storedLength, e.plainLength, e.type, e.codec);
      }
    });
  }

  static open(file: string): BlobIndex {
    let db: Database.Database;
    try {
      db = new Database(file);
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = FULL');
      db.pragma('busy_timeout = 5000');
      db.exec(SCHEMA);
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot open blob index ${file}: ${(e as Error).message}`, { cause: e });
    }
    return new BlobIndex(db);
  }

  has(digest: Buffer): boolean {
    return this.hasStmt.get(digest) !== undefined;
  }

  lookup(digest: Buffer): BlobLocation | undefined {
    const r = this.locStmt.get(digest);
    if (!r) return undefined;
    return { pack: r[0], offset: r[1], storedLength: r[2], plainLength: r[3], type: r[4] as BlobType, codec: r[5] };
  }

  hasPack(id: string): boolean {
    return this.db.prepare('SELECT 1 FROM packs WHERE id = ?').get(id) !== undefined;
  }

  packIds(): Set<string> {
    return new Set(this.db.prepare<[], string>('SELECT id FROM packs').pluck().all());
  }

  /** Inserts a durable pack and its blobs in one transaction; a known pack is a no-op. */
  insertPack(pack: IndexedPack): void {
    try {
      this.insertPackTx(pack);
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `blob index insert of pack ${pack.id}: ${(e as Error).message}`, { cause: e });
    }
  }

  stats(): { packs: number; blobs: number; bytes: number } {
    const p = this.db.prepare('SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM packs').get() as {
      n: number;
      bytes: number;
    };
    const b = this.db.prepare('SELECT COUNT(*) FROM blobs').pluck().get() as number;
    return { packs: p.n, blobs: b, bytes: p.bytes };
  }

  /** Forgets every row (only for a rebuild from the packs). */
  clear(): void {
    this.db.transaction(() => {
      this.db.exec('DELETE FROM blobs; DELETE FROM packs;');
    })();
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}

/**
 * Indexes the packs under `packsDir` from their trailers. With `all` false
 * only packs missing from the index (a crash between rename and insert);
 * with `all` true the index is cleared first and rebuilt. A pack whose footer
 * or trailer fails its checks stops the scan with E_STORE_CORRUPT naming it:
 * silently skipping it could hide blobs an image needs.
 */
export async function indexPacksFromFiles(
  index: BlobIndex,
  packsDir: string,
  opts: { all: boolean },
): Promise<{ packs: number; blobs: number }> {
  if (opts.all) index.clear();
  const known = index.packIds();
  let packs = 0;
  let blobs = 0;
  for (const { id, path } of await listPackFiles(packsDir)) {
    if (known.has(id)) continue;
    const reader = await PackReader.open(path, id);
    try {
      const entries = await reader.entries();
      index.insertPack({ id, size: reader.size, entries });
      packs++;
      blobs += entries.length;
    } finally {
      await reader.close();
    }
  }
  return { packs, blobs };
}
