/**
 * Prune semantics (issue 11), table-tested: Proxmox Backup Server's
 * documented rules in UTC — the newest image of each period is kept, options
 * are applied last → yearly and only reach back past what earlier ones
 * covered; calendar edges (midnight, ISO weeks at the year end, leap day);
 * image sets kept or removed whole; protections win.
 */
import { describe, expect, it } from 'vitest';
import { decidePrune, isoWeek, type KeepOptions } from '../../appliance/retention/prune-policy.js';
import { planPrune } from '../../appliance/retention/retention-service.js';
import type { ImageRow } from '../../appliance/catalog/catalog.js';

const img = (createdAt: string, id = createdAt) => ({ id, createdAt });

interface Row { name: string; times: string[]; keep: KeepOptions; kept: string[] }

const TABLE: Row[] = [
  { name: 'keep-last 3 keeps the three newest', times: ['2024-01-01T00:00:00Z', '2024-01-02T00:00:00Z', '2024-01-03T00:00:00Z', '2024-01-04T00:00:00Z', '2024-01-05T00:00:00Z'],
    keep: { last: 3 }, kept: ['2024-01-03T00:00:00Z', '2024-01-04T00:00:00Z', '2024-01-05T00:00:00Z'] },
  { name: 'keep-daily 2: the newest of each of the last two days that have images',
    times: ['2024-05-01T08:00:00Z', '2024-05-01T20:00:00Z', '2024-05-03T01:00:00Z', '2024-05-03T23:59:59Z', '2024-05-04T00:00:00Z'],
    keep: { daily: 2 }, kept: ['2024-05-03T23:59:59Z', '2024-05-04T00:00:00Z'] },
  { name: 'keep-hourly 2 across midnight UTC', times: ['2024-06-30T22:10:00Z', '2024-06-30T23:05:00Z', '2024-06-30T23:55:00Z', '2024-07-01T00:01:00Z'],
    keep: { hourly: 2 }, kept: ['2024-06-30T23:55:00Z', '2024-07-01T00:01:00Z'] },
  { name: 'keep-weekly: Thu 2020-12-31 and Sun 2021-01-03 are ISO week 2020-53, Mon 2021-01-04 starts 2021-01',
    times: ['2020-12-28T12:00:00Z', '2020-12-31T12:00:00Z', '2021-01-03T12:00:00Z', '2021-01-04T00:00:00Z'],
    keep: { weekly: 2 }, kept: ['2021-01-03T12:00:00Z', '2021-01-04T00:00:00Z'] },
  { name: 'keep-monthly over a leap day', times: ['2024-02-28T00:00:00Z', '2024-02-29T23:00:00Z', '2024-03-01T00:00:00Z', '2024-01-31T23:59:59Z'],
    keep: { monthly: 3 }, kept: ['2024-01-31T23:59:59Z', '2024-02-29T23:00:00Z', '2024-03-01T00:00:00Z'] },
  { name: 'keep-yearly: the newest of each year, new year at UTC midnight', times: ['2022-12-31T23:59:59Z', '2023-01-01T00:00:00Z', '2023-07-01T00:00:00Z', '2021-03-01T00:00:00Z'],
    keep: { yearly: 2 }, kept: ['2022-12-31T23:59:59Z', '2023-07-01T00:00:00Z'] },
  { name: 'options combine: keep-last 1 covers today, keep-daily 2 reaches two more days back',
    times: ['2024-05-01T10:00:00Z', '2024-05-02T10:00:00Z', '2024-05-02T11:00:00Z', '2024-05-03T09:00:00Z', '2024-05-03T10:00:00Z'],
    keep: { last: 1, daily: 2 }, kept: ['2024-05-01T10:00:00Z', '2024-05-02T11:00:00Z', '2024-05-03T10:00:00Z'] },
  { name: 'times are UTC: 01:30+02:00 on April 1st is still March 31st',
    times: ['2024-03-31T10:00:00Z', '2024-04-01T01:30:00+02:00', '2024-04-01T10:00:00Z'],
    keep: { daily: 2 }, kept: ['2024-04-01T01:30:00+02:00', '2024-04-01T10:00:00Z'] },
  { name: 'an image removed by keep-weekly is not taken back by keep-monthly (PBS marks it removed)',
    // Week 2024-05 runs Mon Jan 29 .. Sun Feb 4: Jan 30 is an older image of a week whose Feb 2 image was kept.
    times: ['2024-01-30T00:00:00Z', '2024-02-02T00:00:00Z'],
    keep: { weekly: 1, monthly: 2 }, kept: ['2024-02-02T00:00:00Z'] },
  { name: 'more periods asked than exist keeps one per period', times: ['2024-01-01T00:00:00Z', '2024-01-01T05:00:00Z', '2024-01-02T00:00:00Z'],
    keep: { daily: 30 }, kept: ['2024-01-01T05:00:00Z', '2024-01-02T00:00:00Z'] },
  { name: 'no keep option keeps everything', times: ['2024-01-01T00:00:00Z', '2024-01-02T00:00:00Z'], keep: {}, kept: ['2024-01-01T00:00:00Z', '2024-01-02T00:00:00Z'] },
];

describe('prune decision (PBS semantics, UTC)', () => {
  for (const row of TABLE) {
    it(row.name, () => {
      const d = decidePrune(row.times.map((t) => img(t)), row.keep);
      expect([...d.keep.keys()].sort()).toEqual([...row.kept].sort());
      expect(d.remove.sort()).toEqual(row.times.filter((t) => !row.kept.includes(t)).sort());
    });
  }

  it('ISO week numbers at year ends', () => {
    const cases: [string, string][] = [
      ['2015-12-31T00:00:00Z', '2015/53'], ['2016-01-03T23:59:59Z', '2015/53'], ['2016-01-04T00:00:00Z', '2016/01'],
      ['2018-12-31T00:00:00Z', '2019/01'], ['2021-01-01T00:00:00Z', '2020/53'], ['2024-12-30T00:00:00Z', '2025/01'],
      ['2027-01-01T00:00:00Z', '2026/53'], ['2024-02-29T00:00:00Z', '2024/09'],
    ];
    for (const [t, w] of cases) expect(isoWeek(new Date(t)), t).toBe(w);
  });
});

describe('prune plan: image sets and protections', () => {
  const row = (id: string, volume: string, createdAt: string, setId: string | null = null): ImageRow => ({
    id, volumeId: 1, agent: 'db1', volume, jobId: null, kind: 'full', basisImageId: null, rootDigest: 'ab', volumeSize: 1, chunkSize: 4096,
    createdAt, stats: null, pg: null, setId, damage: [],
  });
  const all = [
    row('a1', 'data', '2024-01-01T00:00:00Z', 's1'), row('w1', 'wal', '2024-01-01T00:00:00Z', 's1'),
    row('a2', 'data', '2024-01-02T00:00:00Z', 's2'), row('w2', 'wal', '2024-01-02T00:00:00Z', 's2'),
    row('a3', 'data', '2024-01-03T00:00:00Z', 's3'), row('w3', 'wal', '2024-01-03T00:00:00Z', 's3'),
    row('x1', 'other', '2024-01-01T00:00:00Z'), row('x2', 'other', '2024-01-02T00:00:00Z'),
  ];
  const noProtection = () => null;

  it('removes a set whole, also its members outside --volume', () => {
    const lines = planPrune(all.filter((i) => i.volume === 'data'), all, () => ({ last: 1 }), noProtection, new Set());
    const removed = lines.filter((l) => l.action === 'remove').map((l) => l.imageId).sort();
    expect(removed).toEqual(['a1', 'a2', 'w1', 'w2']);
  });

  it('a member that must stay keeps its whole set (here: a pinned WAL member)', () => {
    const lines = planPrune(all.filter((i) => i.volume === 'data'), all, () => ({ last: 1 }), (id, pinned) => (pinned.has(id) ? 'pinned' : null), new Set(['w1']));
    const removed = lines.filter((l) => l.action === 'remove').map((l) => l.imageId).sort();
    expect(removed).toEqual(['a2', 'w2']);
    expect(lines.find((l) => l.imageId === 'a1')!.reason).toBe('member of set s1, which is kept');
  });

  it('per-volume decisions: keeping the last of one volume does not keep another volume\'s images', () => {
    const lines = planPrune(all, all, () => ({ last: 1 }), noProtection, new Set());
    expect(lines.filter((l) => l.action === 'keep').map((l) => l.imageId).sort()).toEqual(['a3', 'w3', 'x2']);
  });

  it('a protected image stays and says why', () => {
    const lines = planPrune(all.filter((i) => i.volume === 'other'), all, () => ({ last: 1 }), (id) => (id === 'x1' ? 'mounted' : null), new Set());
    expect(lines.find((l) => l.imageId === 'x1')).toMatchObject({ action: 'keep', reason: 'mounted' });
  });
});
