import type { BlockDeviceInfo } from '../device-identity.js';
import type { Generations } from '../generations.js';
import { Rwbs, type TraceSink } from './trace-line-parser.js';

/**
 * Turns parsed trace records of one instance into bitmap updates. Runs once
 * per traced bio: numbers in, bits set, nothing allocated.
 *
 * - The kernel filter already keeps only this disk and non-reads; the checks
 *   are repeated because a record that slipped through must not set bits of
 *   another device.
 * - A zero-sector record is a flush: no content. A zero-sector N (zone
 *   reset/finish) changes content we cannot locate: invalid.
 * - For a partition the record is in disk sectors: only the part inside the
 *   partition counts, shifted to partition-relative sectors (a write made
 *   through the whole disk into the partition is ours too).
 * - Lost events and lines we cannot parse invalidate the open generations.
 */
export function bioSink(dev: BlockDeviceInfo, gens: Generations, onMarker: (text: string) => void): TraceSink {
  const { traceMajor, traceMinor, startSector } = dev;
  const sectors = dev.identity.size / 512;
  return {
    bio: (major, minor, rwbs, sector, count) => {
      if (major !== traceMajor || minor !== traceMinor || (rwbs & Rwbs.LEADING_R) !== 0) return;
      if (count === 0) {
        if ((rwbs & Rwbs.N) !== 0) gens.invalidate(`zero-length content-changing op at sector ${sector}`);
        return;
      }
      if (startSector === 0) {
        gens.recordSectors(sector, count);
        return;
      }
      const from = Math.max(sector, startSector);
      const to = Math.min(sector + count, startSector + sectors);
      if (to > from) gens.recordSectors(from - startSector, to - from);
    },
    lost: (cpu, count) =>
      gens.invalidate(`trace_pipe reported ${count < 0 ? 'an unknown number of' : count} lost events on CPU ${cpu}`),
    marker: onMarker,
    malformed: (line) => gens.invalidate(`unparseable trace line: ${line.slice(0, 120)}`),
  };
}
