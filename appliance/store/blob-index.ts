/**
 * Blob index (DESIGN.md §3.2): where each durable blob lives. A cache of the
 * pack trailers: rows go in only after their pack is durable, and the whole
 * index can be rebuilt from the packs (`reindexFromPacks`).
 *
 * blobs(digest BLOB PRIMARY KEY, pack TEXT, offset INTEGER, stored_len
 * INTEGER, plain_len INTEGER, type INTEGER, codec INTEGER) — WITHOUT ROWID so
 * a lookup is a single B-tree descent on the digest.
 * packs(id TEXT PRIMARY KEY, size INTEGER, blobs INTEGER).
 *
 * Next to the cache, in the same file, the **pending-pack journal** (DESIGN.md
 * §5): pending_packs(pack, writer) says which blob writers (one per ingest)
 * made or depend on a pack no committed image is known to use yet, and
 * pending_roots(writer, root) which image roots a writer stored. It is not a
 * cache: losing it only leaves garbage for GC, never deletes a needed pack.
 */
import type Database from 'better-sqlite3';
import { BlocksnapError } from '../../proto/errors.js';
import { openPrivateDatabase } from './private-sqlite.js';
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
CREATE TABLE IF NOT EXISTS pending_packs (pack TEXT NOT NULL, writer TEXT NOT NULL, PRIMARY KEY (pack, writer)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_roots (writer TEXT NOT NULL, root BLOB NOT NULL, PRIMARY KEY (writer, root)) WITHOUT ROWID;
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
  private readonly insertPackTx: (pack: IndexedPack) => Set<string>;
  private readonly packOfStmt: Database.Statement<[Buffer], string>;

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
    this.packOfStmt = db.prepare<[Buffer], string>('SELECT pack FROM blobs WHERE digest = ?').pluck();
    this.insertPackTx = db.transaction((pack: IndexedPack) => {
      const winners = new Set<string>();
      if (insPack.run(pack.id, pack.size, pack.entries.length).changes === 0) return winners;
      for (const e of pack.entries) {
        if (insBlob.run(e.digest, pack.id, e.offset, e.storedLength, e.plainLength, e.type, e.codec).changes === 0) {
          const w = this.packOfStmt.get(e.digest);
          if (w !== undefined) winners.add(w);
        }
      }
      return winners;
    });
  }

  /** Opens (creating, 0600) the index; one SQLite cannot read is E_STORE_CORRUPT (the store then rebuilds it from the packs). */
  static open(file: string): BlobIndex {
    let db: Database.Database | undefined;
    try {
      db = openPrivateDatabase(file);
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = FULL');
      db.pragma('busy_timeout = 5000');
      db.exec(SCHEMA);
    } catch (e) {
      db?.close();
      const code = String((e as { code?: string }).code ?? '');
      const unreadable = code.startsWith('SQLITE_CORRUPT') || code.startsWith('SQLITE_NOTADB');
      throw new BlocksnapError(unreadable ? 'E_STORE_CORRUPT' : 'E_STORE_IO', `cannot open blob index ${file}: ${(e as Error).message}`, { cause: e });
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

  /** The pack the index reads `digest` from. */
  packOf(digest: Buffer): string | undefined {
    return this.packOfStmt.get(digest);
  }

  hasPack(id: string): boolean {
    return this.db.prepare('SELECT 1 FROM packs WHERE id = ?').get(id) !== undefined;
  }

  /** Every indexed pack with the size it had when indexed. */
  packSizes(): Map<string, number> {
    return new Map((this.db.prepare('SELECT id, size FROM packs').raw().all() as [string, number][]));
  }

  packIds(): Set<string> {
    return new Set(this.db.prepare<[], string>('SELECT id FROM packs').pluck().all());
  }

  /**
   * Inserts a durable pack and its blobs in one transaction; a known pack is a
   * no-op. Returns the other packs the index keeps reading some of this
   * pack's blobs from (first copy wins, §3.1): whoever relies on this pack
   * relies on those too.
   */
  insertPack(pack: IndexedPack): Set<string> {
    try {
      return this.insertPackTx(pack);
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

  /**
   * Forgets a pack: its blob rows (by the digests of its trailer when known,
   * else by a scan for the pack) and its packs row, in one transaction (its
   * journal rows stay until the file is gone: `settlePack`). Returns the
   * digests whose rows pointed at it.
   */
  removePack(id: string, digests?: readonly Buffer[]): Buffer[] {
    return this.db.transaction(() => {
      let gone: Buffer[];
      if (digests) {
        const del = this.db.prepare('DELETE FROM blobs WHERE digest = ? AND pack = ?');
        gone = digests.filter((d) => del.run(d, id).changes > 0);
      } else {
        gone = this.db.prepare<[string], Buffer>('SELECT digest FROM blobs WHERE pack = ?').pluck().all(id);
        this.db.prepare('DELETE FROM blobs WHERE pack = ?').run(id);
      }
      this.db.prepare('DELETE FROM packs WHERE id = ?').run(id);
      return gone;
    })();
  }

  // ---- garbage collection (DESIGN.md §12; appliance/retention/gc.ts) -------

  /**
   * Blob rows as [digest, pack, stored_len] in digest order, at most `limit`
   * after `after` (the GC's mark table, read in batches so a large index does
   * not hold the event loop); returns the last digest, or undefined at the end.
   */
  scanBlobs(each: (digest: Buffer, pack: string, storedLength: number) => void, after?: Buffer, limit = 20_000): Buffer | undefined {
    const rows = (after
      ? this.db.prepare('SELECT digest, pack, stored_len FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?').raw().all(after, limit)
      : this.db.prepare('SELECT digest, pack, stored_len FROM blobs ORDER BY digest LIMIT ?').raw().all(limit)) as [Buffer, string, number][];
    for (const r of rows) each(r[0], r[1], r[2]);
    return rows.length === limit ? rows[rows.length - 1]![0] : undefined;
  }

  /**
   * GC sweep of whole packs, one transaction (one fsync for many packs): the
   * rows of each pack's `dead` digests that still point at it go, and its
   * packs row. The files are removed after this returns, so a crash in
   * between leaves unindexed packs that the next start indexes again:
   * garbage, never a missing pack.
   */
  sweepPacks(packs: readonly { pack: string; dead: readonly Buffer[] }[]): number {
    return this.db.transaction(() => {
      const del = this.db.prepare('DELETE FROM blobs WHERE digest = ? AND pack = ?');
      const drop = this.db.prepare('DELETE FROM packs WHERE id = ?');
      let n = 0;
      for (const p of packs) {
        for (const d of p.dead) n += del.run(d, p.pack).changes;
        drop.run(p.pack);
      }
      return n;
    })();
  }

  /**
   * GC rewrite, one transaction: `next` (durable, holding copies of the live
   * blobs of `old`) is indexed, the live rows move from `old` to it, the dead
   * rows of `old` and its packs row go.
   */
  movePack(old: string, next: IndexedPack, dead: readonly Buffer[]): void {
    this.db.transaction(() => {
      this.db.prepare('INSERT OR IGNORE INTO packs (id, size, blobs) VALUES (?, ?, ?)').run(next.id, next.size, next.entries.length);
      const upd = this.db.prepare('UPDATE blobs SET pack = ?, offset = ?, stored_len = ?, codec = ? WHERE digest = ? AND pack = ?');
      for (const e of next.entries) upd.run(next.id, e.offset, e.storedLength, e.codec, e.digest, old);
      const del = this.db.prepare('DELETE FROM blobs WHERE digest = ? AND pack = ?');
      for (const d of dead) del.run(d, old);
      this.db.prepare('DELETE FROM packs WHERE id = ?').run(old);
    })();
  }

  // ---- pending-pack journal (DESIGN.md §5) --------------------------------

  /**
   * Records that `writer` made or depends on `pack`, and the roots it stored,
   * in one transaction. Durable when this returns, unless `fsync` is false:
   * then it survives a process crash (the WAL is in the page cache) and
   * becomes durable with the next durable commit. A new pack's row uses
   * that: its pack's index insert, which follows at once, syncs both, and
   * the row costs no fsync of its own (2.5 ms here, on the ingest path).
   */
  journal(packs: readonly { pack: string; writer: string }[], roots: readonly { writer: string; root: Buffer }[] = [], fsync = true): void {
    if (packs.length === 0 && roots.length === 0) return;
    const insP = this.db.prepare('INSERT OR IGNORE INTO pending_packs (pack, writer) VALUES (?, ?)');
    const insR = this.db.prepare('INSERT OR IGNORE INTO pending_roots (writer, root) VALUES (?, ?)');
    try {
      if (!fsync) this.db.pragma('synchronous = NORMAL');
      this.db.transaction(() => {
        for (const p of packs) insP.run(p.pack, p.writer);
        for (const r of roots) insR.run(r.writer, r.root);
      })();
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `pending-pack journal: ${(e as Error).message}`, { cause: e });
    } finally {
      if (!fsync) this.db.pragma('synchronous = FULL');
    }
  }

  /** Every journalled writer with its packs and roots. */
  pendingWriters(): Map<string, { packs: Set<string>; roots: Buffer[] }> {
    const out = new Map<string, { packs: Set<string>; roots: Buffer[] }>();
    const get = (w: string) => {
      let v = out.get(w);
      if (!v) out.set(w, (v = { packs: new Set(), roots: [] }));
      return v;
    };
    for (const r of this.db.prepare('SELECT pack, writer FROM pending_packs').all() as { pack: string; writer: string }[]) get(r.writer).packs.add(r.pack);
    for (const r of this.db.prepare('SELECT writer, root FROM pending_roots').all() as { writer: string; root: Buffer }[]) get(r.writer).roots.push(r.root);
    return out;
  }

  /** Packs named in the journal. */
  pendingPackIds(): Set<string> {
    return new Set(this.db.prepare<[], string>('SELECT DISTINCT pack FROM pending_packs').pluck().all());
  }

  /** The pack leaves the journal: a committed image uses it, or it was removed. */
  settlePack(pack: string): void {
    this.db.prepare('DELETE FROM pending_packs WHERE pack = ?').run(pack);
  }

  /** Drops a writer's journal rows (its packs are settled or removed). */
  forgetWriter(writer: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM pending_packs WHERE writer = ?').run(writer);
      this.db.prepare('DELETE FROM pending_roots WHERE writer = ?').run(writer);
    })();
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

export interface SkippedPack {
  pack: string;
  reason: string;
  /** Where the pack went, relative to the data directory, if it was quarantined. */
  quarantinedTo?: string;
}

/**
 * Indexes the packs under `packsDir` from their trailers. With `all` false
 * only packs missing from the index (a crash between rename and insert);
 * with `all` true the index is cleared first and rebuilt. A pack whose footer
 * or trailer fails its checks is skipped and reported (and handed to
 * `onCorrupt`, which quarantines it); the scan goes on. Packs of the
 * pending-pack journal go last, so a blob that is also in a pack a committed
 * image uses is read from that one (first copy wins).
 */
export async function indexPacksFromFiles(
  index: BlobIndex,
  packsDir: string,
  opts: {
    all: boolean;
    onCorrupt?: (id: string, path: string, err: BlocksnapError) => Promise<string | undefined>;
    /** The packs under packsDir if the caller just listed them (a listing is O(packs)). */
    files?: { id: string; path: string }[];
  },
): Promise<{ packs: number; blobs: number; skipped: SkippedPack[] }> {
  if (opts.all) index.clear();
  const known = index.packIds();
  const pending = index.pendingPackIds();
  const files = (opts.files ?? (await listPackFiles(packsDir))).filter((f) => !known.has(f.id));
  files.sort((a, b) => Number(pending.has(a.id)) - Number(pending.has(b.id)));
  let packs = 0;
  let blobs = 0;
  const skipped: SkippedPack[] = [];
  for (const { id, path } of files) {
    let entries: TrailerEntry[];
    let size: number;
    try {
      const reader = await PackReader.open(path, id);
      try {
        entries = await reader.entries();
        size = reader.size;
      } finally {
        await reader.close();
      }
    } catch (e) {
      if (!(e instanceof BlocksnapError) || e.code !== 'E_STORE_CORRUPT') throw e;
      skipped.push({ pack: id, reason: e.message, quarantinedTo: await opts.onCorrupt?.(id, path, e) });
      continue;
    }
    index.insertPack({ id, size, entries });
    packs++;
    blobs += entries.length;
  }
  return { packs, blobs, skipped };
}
