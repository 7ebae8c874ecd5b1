import { BlocksnapError } from '../../proto/errors.js';
import { WAL_PIECE_BYTES, type PgBackupInfo, type WalPiece } from '../../proto/messages.js';
import { ZERO_DIGEST } from '../store/chunk-store.js';
import type { PgImageInfo, WalPieceRef } from '../store/pg-image-info.js';

export const MAX_WAL_FILES = 64;

/**
 * What an app-consistent job carries besides its chunks: the quiesce
 * window's result (PgBackupInfo) and the WAL pieces, assembled into the
 * manifest's `pg` section (§8). It bounds what an agent can make it hold:
 * at most MAX_WAL_FILES files, each cut into fixed WAL_PIECE_BYTES pieces,
 * so at most fileSize / 4 MiB entries per file whatever the agent sends.
 */
export class WalCollector {
  private info: PgBackupInfo | null = null;
  private readonly files = new Map<string, { size: number; pieces: Map<number, WalPieceRef>; sent: Map<number, string> }>();

  get hasInfo(): boolean {
    return this.info !== null;
  }

  get pg(): PgBackupInfo | null {
    return this.info;
  }

  setInfo(info: PgBackupInfo): void {
    this.info = info;
  }

  /**
   * Checks a piece before its data is stored. Returns false for the same
   * piece resent after a resume (nothing to store), true for a new one;
   * throws E_PROTOCOL for anything outside the layout.
   */
  accept(jobId: string, w: WalPiece): boolean {
    if (!this.info) throw new BlocksnapError('E_PROTOCOL', `job ${jobId}: WAL before the PostgreSQL backup info`);
    let file = this.files.get(w.fileName);
    if (!file) {
      if (this.files.size >= MAX_WAL_FILES) throw new BlocksnapError('E_PROTOCOL', `job ${jobId}: more than ${MAX_WAL_FILES} WAL files`);
      file = { size: w.fileSize, pieces: new Map(), sent: new Map() };
      this.files.set(w.fileName, file);
    }
    if (file.size !== w.fileSize) throw new BlocksnapError('E_PROTOCOL', `WAL ${w.fileName}: size changed`);
    if (w.offset % WAL_PIECE_BYTES !== 0 || w.plainLength !== Math.min(WAL_PIECE_BYTES, w.fileSize - w.offset)) {
      throw new BlocksnapError('E_PROTOCOL', `WAL ${w.fileName}: piece at ${w.offset} of ${w.plainLength} bytes is not a ${WAL_PIECE_BYTES}-byte piece`);
    }
    const wire = Buffer.from(w.digest).toString('hex');
    const known = file.sent.get(w.offset);
    if (known !== undefined) {
      // Resent after a resume (the agent re-sends its pg info and WAL): the same piece is harmless, another is not.
      if (known !== wire) throw new BlocksnapError('E_PROTOCOL', `WAL ${w.fileName}: piece at ${w.offset} changed`);
      return false;
    }
    file.sent.set(w.offset, wire);
    return true;
  }

  /** Records a stored piece (zero: all-zero data, recorded as ZERO and not stored). */
  stored(w: WalPiece, zero: boolean): void {
    const digest = (zero ? ZERO_DIGEST : Buffer.from(w.digest)).toString('hex');
    this.files.get(w.fileName)!.pieces.set(w.offset, { offset: w.offset, length: w.plainLength, digest });
  }

  /** The manifest's `pg` section; validatePgInfo (via the manifest) checks the pieces cover every file. */
  pgInfo(): PgImageInfo | undefined {
    const p = this.info;
    if (!p) return undefined;
    const wal = [...this.files.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([name, f]) => ({
      name, size: f.size, pieces: [...f.pieces.values()].sort((a, b) => a.offset - b.offset),
    }));
    return {
      labelFile: p.labelFile, spcmapFile: p.spcmapFile, startLsn: p.startLsn, stopLsn: p.stopLsn, timeline: p.timeline,
      replayLsn: p.replayLsn, exclusive: p.exclusive, serverVersion: p.serverVersion, role: p.role as 'primary' | 'standby',
      pausedSeconds: p.pausedSeconds, backupSeconds: p.backupSeconds, walSegmentSize: p.walSegmentSize, wal,
    };
  }

  /** The quiesce windows a job reports next to its freeze window. */
  windows(): Record<string, number | string> {
    const p = this.info;
    return p ? { pgRole: p.role, pgPausedSeconds: p.pausedSeconds, pgBackupSeconds: p.backupSeconds } : {};
  }
}
