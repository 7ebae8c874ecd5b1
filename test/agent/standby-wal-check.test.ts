import { describe, expect, it } from 'vitest';
import { missingStandbyWal } from '../../agent/pg/standby-wal-check.js';
import { isBlocksnapError } from '../../proto/errors.js';

/** The pure part of the standby image's WAL check (agent/pg/standby-wal-check.ts); pg-quiescer runs it on the live directory. */
const label = (start: string, tli = 1) =>
  `START WAL LOCATION: ${start} (file 00000001000000000000000X)\nCHECKPOINT LOCATION: ${start}\nBACKUP METHOD: streamed\nBACKUP FROM: standby\nSTART TIME: x\nLABEL: l\nSTART TIMELINE: ${tli}\n`;
const MiB16 = 16 << 20;

describe('missingStandbyWal', () => {
  it('none missing when every segment from the start to the stop is there; other files do not count', () => {
    const names = ['000000010000000000000002', '000000010000000000000003', '000000010000000000000004', '00000001.history', 'archive_status', '000000010000000000000005.partial'];
    expect(missingStandbyWal(label('0/2000028'), '0/4000060', MiB16, names)).toEqual([]);
  });

  it('names each missing one on the label\'s timeline: the start\'s segment, one in the middle, the stop\'s', () => {
    expect(missingStandbyWal(label('0/2000028'), '0/4000060', MiB16, ['000000010000000000000003'])).toEqual([
      '000000010000000000000002', '000000010000000000000004',
    ]);
    expect(missingStandbyWal(label('0/2000028'), '0/2000100', MiB16, [])).toEqual(['000000010000000000000002']);
  });

  it('a stop point on a segment boundary ends in the segment before: the next one is not needed (it may not exist yet)', () => {
    expect(missingStandbyWal(label('0/2000028'), '0/3000000', MiB16, ['000000010000000000000002'])).toEqual([]);
    expect(missingStandbyWal(label('0/2000028'), '0/3000001', MiB16, ['000000010000000000000002'])).toEqual(['000000010000000000000003']);
  });

  it('a segment on a later timeline counts (a standby that followed a switch names the later ones so)', () => {
    expect(missingStandbyWal(label('0/2000028'), '0/3000060', MiB16, ['000000010000000000000002', '000000020000000000000003'])).toEqual([]);
  });

  it('1 MiB segments: 4096 per 4 GiB, the high part of the name counts', () => {
    const seg = 1 << 20;
    expect(missingStandbyWal(label('1/FFF00028'), '2/00000100', seg, ['000000010000000100000FFF'])).toEqual(['000000010000000200000000']);
  });

  it('refuses a label without a start, a stop before the start, an implausible segment size', () => {
    for (const f of [
      () => missingStandbyWal('LABEL: x\n', '0/1', MiB16, []),
      () => missingStandbyWal(label('0/4000028'), '0/2000000', MiB16, []),
      () => missingStandbyWal(label('0/2000028'), '0/4000060', 12345, []),
    ]) {
      let err: unknown;
      try {
        f();
      } catch (e) {
        err = e;
      }
      expect(isBlocksnapError(err, 'E_PG'), String(err)).toBe(true);
    }
  });
});
