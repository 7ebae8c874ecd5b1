/**
 * Parser of the text a tracefs instance's `trace_pipe` produces, fed with
 * raw bytes in whatever pieces read() returned (a read can end mid-line).
 *
 * The lines we care about (kernel print formats, 6.x):
 *
 *   <comm>-<pid> [<cpu>] <flags> <ts>: block_bio_queue: <maj>,<min> <rwbs> <sector> + <count> [<comm>]
 *   <comm>-<pid> [<cpu>] <flags> <ts>: tracing_mark_write: <text>
 *   CPU:<n> [LOST <count> EVENTS]
 *
 * The event name is found by searching for ": block_bio_queue: " inside the
 * line, never by counting fields from the start: a task's comm may contain
 * spaces, dashes, colons and brackets, but it is at most 15 bytes, so it
 * cannot contain the 19-byte event tag (nor ": tracing_mark_write: ").
 *
 * Hot path without regex and without allocation: a bio line is scanned byte
 * by byte and handed to the sink as numbers. Only marker lines (rare, ours)
 * and lines we do not understand allocate a string. A line that names the
 * bio event but does not parse is reported as malformed — the tracker treats
 * that as a possible miss, never skips it silently.
 */

/** Bits of `rwbs`: one per letter the kernel's blk_fill_rwbs() emits. */
export const Rwbs = {
  R: 1 << 0, // read (always the leading op letter of a read)
  W: 1 << 1, // write
  D: 1 << 2, // discard
  E: 1 << 3, // secure erase (with D)
  N: 1 << 4, // any other op: write-zeroes, zone ops, driver ops
  F: 1 << 5, // preflush / FUA / flush
  A: 1 << 6, // readahead
  S: 1 << 7, // sync
  M: 1 << 8, // metadata
  U: 1 << 9, // atomic
  OTHER: 1 << 15, // a letter this parser does not know (future kernels)
  /** Set when the *first* letter is R: the request only reads. */
  LEADING_R: 1 << 16,
} as const;

export interface TraceSink {
  /** A block_bio_queue record; `rwbs` is a mask of `Rwbs` bits. */
  bio(major: number, minor: number, rwbs: number, sector: number, count: number): void;
  /** `CPU:n [LOST count EVENTS]`; count is -1 when it did not parse. */
  lost(cpu: number, count: number): void;
  /** A trace_marker line's text. */
  marker(text: string): void;
  /** A non-empty line that is none of the above (or a broken bio line). */
  malformed(line: string): void;
}

const NL = 0x0a;
const BIO_TAG = Buffer.from(': block_bio_queue: ', 'latin1');
const MARK_TAG = Buffer.from(': tracing_mark_write: ', 'latin1');
const LOST_TAG = Buffer.from('[LOST ', 'latin1');
const CPU_TAG = Buffer.from('CPU:', 'latin1');

/** A read never has a line longer than this; it only sizes the first carry. */
const INITIAL_CARRY = 4096;

export class TraceLineParser {
  private carry = Buffer.allocUnsafe(INITIAL_CARRY);
  private carryLen = 0;
  private readonly sink: TraceSink;

  constructor(sink: TraceSink) {
    this.sink = sink;
  }

  /** Feeds the next bytes of the stream. */
  push(chunk: Uint8Array): void {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let start = 0;
    if (this.carryLen > 0) {
      const nl = buf.indexOf(NL);
      if (nl < 0) {
        this.appendCarry(buf, 0, buf.length);
        return;
      }
      this.appendCarry(buf, 0, nl);
      parseLine(this.carry, 0, this.carryLen, this.sink);
      this.carryLen = 0;
      start = nl + 1;
    }
    for (;;) {
      const nl = buf.indexOf(NL, start);
      if (nl < 0) break;
      parseLine(buf, start, nl, this.sink);
      start = nl + 1;
    }
    if (start < buf.length) this.appendCarry(buf, start, buf.length);
  }

  /** End of stream: a last line without newline is still a line. */
  end(): void {
    if (this.carryLen > 0) parseLine(this.carry, 0, this.carryLen, this.sink);
    this.carryLen = 0;
  }

  /** Bytes of an unfinished line held back (tests use it). */
  get pending(): number {
    return this.carryLen;
  }

  private appendCarry(src: Buffer, from: number, to: number): void {
    const need = this.carryLen + (to - from);
    if (need > this.carry.length) {
      const bigger = Buffer.allocUnsafe(Math.max(need, this.carry.length * 2));
      this.carry.copy(bigger, 0, 0, this.carryLen);
      this.carry = bigger;
    }
    src.copy(this.carry, this.carryLen, from, to);
    this.carryLen = need;
  }
}

function indexOfIn(buf: Buffer, from: number, to: number, needle: Buffer): number {
  const n = needle.length;
  const first = needle[0]!;
  outer: for (let i = from; i + n <= to; i++) {
    if (buf[i] !== first) continue;
    for (let j = 1; j < n; j++) if (buf[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function isSpace(c: number | undefined): boolean {
  return c === 0x20 || c === 0x09 || c === 0x0d;
}

/** Parses one line [from, to) (no newline) and reports it to the sink. */
export function parseLine(buf: Buffer, from: number, to: number, sink: TraceSink): void {
  while (from < to && isSpace(buf[from])) from++;
  while (to > from && isSpace(buf[to - 1])) to--;
  if (from === to) return;

  const bioAt = indexOfIn(buf, from, to, BIO_TAG);
  if (bioAt >= 0) {
    if (!parseBio(buf, bioAt + BIO_TAG.length, to, sink)) sink.malformed(buf.toString('latin1', from, to));
    return;
  }
  const markAt = indexOfIn(buf, from, to, MARK_TAG);
  if (markAt >= 0) {
    sink.marker(buf.toString('utf8', markAt + MARK_TAG.length, to));
    return;
  }
  const lostAt = indexOfIn(buf, from, to, LOST_TAG);
  if (lostAt >= 0) {
    let cpu = -1;
    const cpuAt = indexOfIn(buf, from, lostAt, CPU_TAG);
    if (cpuAt >= 0) cpu = readUint(buf, cpuAt + CPU_TAG.length, lostAt).value;
    const n = readUint(buf, lostAt + LOST_TAG.length, to);
    sink.lost(cpu, n.end > lostAt + LOST_TAG.length ? n.value : -1);
    return;
  }
  sink.malformed(buf.toString('latin1', from, to));
}

/** Module-level cursor so readUint can return two numbers without allocating. */
let cursor = 0;

function uintAt(buf: Buffer, pos: number, to: number): number {
  let v = 0;
  const start = pos;
  while (pos < to) {
    const c = buf[pos]!;
    if (c < 0x30 || c > 0x39) break;
    v = v * 10 + (c - 0x30);
    pos++;
  }
  cursor = pos === start ? -1 : pos;
  return v;
}

function readUint(buf: Buffer, pos: number, to: number): { value: number; end: number } {
  const value = uintAt(buf, pos, to);
  return { value, end: cursor < 0 ? pos : cursor };
}

/** "<maj>,<min> <rwbs> <sector> + <count> [<comm>]" */
function parseBio(buf: Buffer, p: number, to: number, sink: TraceSink): boolean {
  const major = uintAt(buf, p, to);
  if (cursor < 0 || buf[cursor] !== 0x2c /* , */) return false;
  const minor = uintAt(buf, cursor + 1, to);
  if (cursor < 0 || buf[cursor] !== 0x20) return false;
  p = cursor + 1;
  let rwbs = 0;
  const rwStart = p;
  while (p < to && buf[p] !== 0x20) {
    rwbs |= letterBit(buf[p]!);
    p++;
  }
  if (p === rwStart || p >= to) return false;
  if (buf[rwStart] === 0x52 /* R */) rwbs |= Rwbs.LEADING_R;
  const sector = uintAt(buf, p + 1, to);
  if (cursor < 0) return false;
  p = cursor;
  // " + " between sector and count
  if (buf[p] !== 0x20 || buf[p + 1] !== 0x2b || buf[p + 2] !== 0x20) return false;
  const count = uintAt(buf, p + 3, to);
  if (cursor < 0) return false;
  if (cursor < to && buf[cursor] !== 0x20) return false;
  sink.bio(major, minor, rwbs, sector, count);
  return true;
}

function letterBit(c: number): number {
  switch (c) {
    case 0x52: return Rwbs.R;
    case 0x57: return Rwbs.W;
    case 0x44: return Rwbs.D;
    case 0x45: return Rwbs.E;
    case 0x4e: return Rwbs.N;
    case 0x46: return Rwbs.F;
    case 0x41: return Rwbs.A;
    case 0x53: return Rwbs.S;
    case 0x4d: return Rwbs.M;
    case 0x55: return Rwbs.U;
    default: return Rwbs.OTHER;
  }
}

/**
 * True when a record may change the device's content: anything that is not
 * a read and carries sectors. Reads always lead with R; a flush carries no
 * sectors; discards (D) and write-zeroes (N) do change content.
 */
export function changesContent(rwbs: number, count: number): boolean {
  return count > 0 && (rwbs & Rwbs.LEADING_R) === 0;
}

export type TraceRecord =
  | { kind: 'bio'; major: number; minor: number; rwbs: number; sector: number; count: number }
  | { kind: 'lost'; cpu: number; count: number }
  | { kind: 'marker'; text: string }
  | { kind: 'malformed'; line: string };

/** Convenience for tests and tools: parses every line of a text. */
export function parseTraceText(text: string): TraceRecord[] {
  const out: TraceRecord[] = [];
  const parser = new TraceLineParser(collectingSink(out));
  parser.push(Buffer.from(text, 'utf8'));
  parser.end();
  return out;
}

export function collectingSink(out: TraceRecord[]): TraceSink {
  return {
    bio: (major, minor, rwbs, sector, count) =>
      out.push({ kind: 'bio', major, minor, rwbs, sector, count }),
    lost: (cpu, count) => out.push({ kind: 'lost', cpu, count }),
    marker: (text) => out.push({ kind: 'marker', text }),
    malformed: (line) => out.push({ kind: 'malformed', line }),
  };
}

/** The letters of a mask for logs, in a fixed order (not the kernel's order). */
export function rwbsToString(rwbs: number): string {
  let s = '';
  for (const [letter, bit] of Object.entries(Rwbs)) {
    if (letter.length === 1 && (rwbs & bit) !== 0) s += letter;
  }
  if (rwbs & Rwbs.OTHER) s += '?';
  return s;
}
