import { describe, expect, it } from 'vitest';
import { MISSED_SAMPLE, TrackerAudit } from '../../agent/audit/tracker-audit.js';
import { ChangeBitmap } from '../../agent/cbt/change-bitmap.js';

describe('TrackerAudit: the tally shared by audited backups and blocksnap-agent audit', () => {
  const bitmapOf = (n: number, marked: number[]) => {
    const b = new ChangeBitmap(n * 4096, 4096);
    for (const i of marked) b.setChunk(i);
    return b;
  };

  it('missed = changed but not marked, extra = marked but unchanged, a re-read chunk counts once', () => {
    const b = bitmapOf(200, [1, 2, 3, 64, 150]);
    const a = new TrackerAudit(b.words, b.count());
    for (const i of [2, 3, 5, 64, 64, 99, 3]) a.changedChunk(i);
    expect(a.result()).toEqual({ changed: 5, tracked: 5, missed: 2, extra: 2, missedSample: [5, 99] });
  });

  it('keeps only the first MISSED_SAMPLE misses as a sample but counts them all', () => {
    const b = bitmapOf(1000, []);
    const a = new TrackerAudit(b.words, 0);
    for (let i = 0; i < 100; i++) a.changedChunk(i * 3);
    const r = a.result();
    expect(r.missed).toBe(100);
    expect(r.missedSample).toEqual(Array.from({ length: MISSED_SAMPLE }, (_, i) => i * 3));
  });
});
