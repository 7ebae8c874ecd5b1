import { BlocksnapError } from '../../proto/errors.js';
import { parseLsn, walFileName } from './sql-table.js';

/**
 * The WAL a standby's image must hold itself. A primary's image carries the
 * segments from its backup's start to its stop (read after the stop); a
 * standby's carries none: recovery of its copy reads them from the pg_wal
 * inside the snapshot — from the label's START WAL LOCATION (the redo point
 * of the checkpoint the label names) to the stop point. If one is missing,
 * the copy stops with "could not locate required checkpoint record" or "WAL
 * ends before end of online backup" — an image that never starts.
 *
 * The quiescer checks the live WAL directory after the backup stop and before
 * replay resumes: while replay is paused no restartpoint removes a segment
 * and nothing recreates an old one, so a segment present then was present at
 * the snapshot, taken earlier in the same pause. (One removed after the
 * snapshot fails the job needlessly: the safe side.)
 *
 * Segments are matched by number on any timeline: a standby that followed a
 * timeline switch between the start and the stop names the later ones on the
 * new timeline.
 */
export function missingStandbyWal(label: string, stopLsn: string, segmentSize: number, present: Iterable<string>): string[] {
  const m = /^START WAL LOCATION: ([0-9A-F]+\/[0-9A-F]+) /m.exec(label);
  if (!m) throw new BlocksnapError('E_PG', 'the backup label has no START WAL LOCATION');
  const timeline = Number(/^START TIMELINE: (\d+)$/m.exec(label)?.[1] ?? 1);
  if (!Number.isInteger(segmentSize) || segmentSize < 2 ** 20 || segmentSize > 2 ** 30 || (segmentSize & (segmentSize - 1)) !== 0) {
    throw new BlocksnapError('E_PG', `implausible WAL segment size ${segmentSize}`);
  }
  const seg = BigInt(segmentSize);
  const perId = 0x100000000n / seg;
  const first = parseLsn(m[1]!) / seg;
  // The stop point ends the last record needed (a standby's minRecoveryPoint): on a segment boundary
  // that record is in the segment before, and the next one may not exist yet.
  const stop = parseLsn(stopLsn);
  const last = stop > 0n ? (stop - 1n) / seg : 0n;
  if (last < first || last - first > 4096n) throw new BlocksnapError('E_PG', `implausible WAL range ${m[1]!}..${stopLsn} for a standby's backup`);
  const have = new Set<bigint>();
  for (const name of present) {
    if (!/^[0-9A-F]{24}$/.test(name)) continue;
    have.add(BigInt(`0x${name.slice(8, 16)}`) * perId + BigInt(`0x${name.slice(16, 24)}`));
  }
  const missing: string[] = [];
  for (let s = first; s <= last; s++) if (!have.has(s)) missing.push(walFileName(timeline, s * seg, segmentSize));
  return missing;
}
