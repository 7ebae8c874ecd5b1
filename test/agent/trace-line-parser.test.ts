import { describe, expect, it } from 'vitest';
import {
  Rwbs,
  TraceLineParser,
  changesContent,
  collectingSink,
  parseTraceText,
  type TraceRecord,
} from '../../agent/cbt/tracefs/trace-line-parser.js';

// Lines as the 6.x kernel prints them in trace_pipe, including awkward comms.
const STREAM = [
  '        postgres-14853 [000] .....   422.810011: block_bio_queue: 7,0 WS 1526896 + 16 [postgres]',
  '   kworker/u8:2-77      [001] ...1.   422.810100: block_bio_queue: 7,0 W 8 + 8 [kworker/u8:2]',
  '      blkdiscard-8358    [001] .....   586.266234: block_bio_queue: 7,0 DS 2048 + 128 [blkdiscard]',
  '      blkdiscard-8359    [001] .....   586.270709: block_bio_queue: 7,0 NS 4096 + 128 [blkdiscard]',
  '     jbd2/loop3-8-412   [000] .....   600.000001: block_bio_queue: 7,3 FWS 0 + 0 [jbd2/loop3-8]',
  '  my [odd]: name-999    [001] .....   601.5: block_bio_queue: 259,1048575 WFSM 18446744073 + 2048 [my [odd]: name]',
  '              dd-1      [000] .....   602.0: block_bio_queue: 7,0 RA 0 + 8 [dd]',
  'CPU:1 [LOST 204 EVENTS]',
  '            bash-8343    [000] ...1.   586.274440: tracing_mark_write: blocksnap-barrier blocksnap-1-2-7_0-1 3',
  '              dd-1      [000] .....   602.1: block_bio_queue: 7,0 WS 12x + 8 [dd]',
  '',
  'something else entirely',
].join('\n') + '\n';

const EXPECTED: TraceRecord[] = [
  { kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.W | Rwbs.S, sector: 1526896, count: 16 },
  { kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.W, sector: 8, count: 8 },
  { kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.D | Rwbs.S, sector: 2048, count: 128 },
  { kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.N | Rwbs.S, sector: 4096, count: 128 },
  { kind: 'bio', major: 7, minor: 3, rwbs: Rwbs.F | Rwbs.W | Rwbs.S, sector: 0, count: 0 },
  {
    kind: 'bio',
    major: 259,
    minor: 1048575,
    rwbs: Rwbs.W | Rwbs.F | Rwbs.S | Rwbs.M,
    sector: 18446744073,
    count: 2048,
  },
  { kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.R | Rwbs.A | Rwbs.LEADING_R, sector: 0, count: 8 },
  { kind: 'lost', cpu: 1, count: 204 },
  { kind: 'marker', text: 'blocksnap-barrier blocksnap-1-2-7_0-1 3' },
  {
    kind: 'malformed',
    line: 'dd-1      [000] .....   602.1: block_bio_queue: 7,0 WS 12x + 8 [dd]',
  },
  { kind: 'malformed', line: 'something else entirely' },
];

function feed(pieces: Buffer[]): TraceRecord[] {
  const out: TraceRecord[] = [];
  const p = new TraceLineParser(collectingSink(out));
  for (const piece of pieces) p.push(piece);
  p.end();
  return out;
}

describe('trace line parser', () => {
  it('parses real kernel lines into numbers, markers, lost counts and malformed lines', () => {
    expect(parseTraceText(STREAM)).toEqual(EXPECTED);
  });

  it('gives the same records at every split point of the stream', () => {
    const bytes = Buffer.from(STREAM, 'utf8');
    for (let i = 0; i <= bytes.length; i++) {
      const got = feed([bytes.subarray(0, i), bytes.subarray(i)]);
      if (JSON.stringify(got) !== JSON.stringify(EXPECTED)) {
        expect({ split: i, got }).toEqual({ split: i, got: EXPECTED });
      }
    }
  });

  it('gives the same records fed one byte at a time and in three uneven pieces', () => {
    const bytes = Buffer.from(STREAM, 'utf8');
    const single = [...bytes].map((b) => Buffer.from([b]));
    expect(feed(single)).toEqual(EXPECTED);
    for (let i = 1; i < bytes.length; i += 37) {
      for (let j = i; j < bytes.length; j += 53) {
        expect(feed([bytes.subarray(0, i), bytes.subarray(i, j), bytes.subarray(j)])).toEqual(EXPECTED);
      }
    }
  });

  it('holds an unfinished line until its newline arrives, and flushes it at end()', () => {
    const out: TraceRecord[] = [];
    const p = new TraceLineParser(collectingSink(out));
    p.push(Buffer.from('  x-1 [000] ..... 1.0: block_bio_queue: 7,0 W 8 + 8 [x]\n  x-1 [000] ..... 1.0: block_bio_que'));
    expect(out).toHaveLength(1);
    expect(p.pending).toBeGreaterThan(0);
    p.push(Buffer.from('ue: 7,0 D 16 + 8 [x]'));
    expect(out).toHaveLength(1);
    p.end();
    expect(out[1]).toEqual({ kind: 'bio', major: 7, minor: 0, rwbs: Rwbs.D, sector: 16, count: 8 });
  });

  it('grows its carry buffer for a line longer than the initial 4 KiB', () => {
    const longComm = 'c'.repeat(6000);
    const line = `  x-1 [000] ..... 1.0: tracing_mark_write: ${longComm}\n`;
    const bytes = Buffer.from(line);
    expect(feed([bytes.subarray(0, 10), bytes.subarray(10, 5000), bytes.subarray(5000)])).toEqual([
      { kind: 'marker', text: longComm },
    ]);
  });

  it('classifies what changes content: writes, discards, write-zeroes; not reads or flushes', () => {
    const recs = parseTraceText(STREAM).filter((r) => r.kind === 'bio');
    const changing = recs.map((r) => (r.kind === 'bio' ? changesContent(r.rwbs, r.count) : null));
    // WS, W, DS, NS count; FWS with 0 sectors is a flush; WFSM counts; RA is a read.
    expect(changing).toEqual([true, true, true, true, false, true, false]);
  });

  it('reports a LOST line whose count does not parse as -1', () => {
    expect(parseTraceText('CPU:0 [LOST many EVENTS]\n')).toEqual([{ kind: 'lost', cpu: 0, count: -1 }]);
  });
});
