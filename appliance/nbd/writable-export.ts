/**
 * An image seen through its copy-on-write overlay (cow-overlay.ts): reads
 * come from the overlay where a chunk was written or zeroed and from the
 * image elsewhere; writes, TRIM and WRITE_ZEROES go to the overlay only. One
 * overlay object is shared by every connection of a mount, so a flush on one
 * makes writes visible and durable for all: CAN_MULTI_CONN.
 */
import { BlocksnapError } from '../../proto/errors.js';
import { ChunkState, type CowOverlay } from './cow-overlay.js';
import type { ImageSource, Segment } from './image-source.js';
import type { NbdExport, NbdRun } from './nbd-export.js';

export function writableExport(source: ImageSource, overlay: CowOverlay): NbdExport {
  if (!overlay.rootDigest.equals(source.rootDigest) || overlay.volumeSize !== source.size || overlay.chunkSize !== source.chunkSize) {
    throw new BlocksnapError('E_IDENTITY', `overlay ${overlay.dir} does not belong to image ${source.rootDigest.toString('hex').slice(0, 16)}…`);
  }
  const cs = source.chunkSize;
  const chunkOf = (offset: number): number => Math.floor(offset / cs);

  /** Whole extent of chunk i with `patch` at `at` within it: image (or zeros) underneath. */
  async function merged(i: number, base: 'image' | 'zero', at: number, patch: Buffer): Promise<Buffer | undefined> {
    const len = overlay.extentLength(i);
    let buf: Buffer | undefined;
    if (base === 'image') {
      for (const s of await source.read(i * cs, len)) {
        if ('data' in s) {
          buf ??= Buffer.alloc(len);
          s.data.copy(buf, s.offset - i * cs);
        }
      }
    }
    // A chunk that is a hole in the image and never written is a hole in the
    // sparse data file too: the patch alone is enough (undefined = "just the patch").
    if (!buf && base === 'image') return undefined;
    buf ??= Buffer.alloc(len);
    patch.copy(buf, at);
    return buf;
  }

  /** Writes `data` at `offset` into chunks first..last, whose locks the caller holds. */
  async function writeLocked(offset: number, data: Buffer): Promise<void> {
    const end = offset + data.length;
    const first = chunkOf(offset);
    const last = chunkOf(end - 1);
    // Whole chunks in the middle (and any chunk already in the overlay): one
    // pwrite; chunks partly covered and not yet in the overlay: copy-up.
    let runStart = -1;
    const flushRun = async (upTo: number): Promise<void> => {
      if (runStart < 0) return;
      const from = Math.max(offset, runStart * cs);
      const to = Math.min(end, upTo * cs);
      await overlay.writeData(from, data.subarray(from - offset, to - offset));
      for (let i = runStart; i < upTo; i++) overlay.setState(i, ChunkState.DATA);
      runStart = -1;
    };
    for (let i = first; i <= last; i++) {
      const cStart = i * cs;
      const cEnd = cStart + overlay.extentLength(i);
      const whole = offset <= cStart && end >= cEnd;
      const st = overlay.state(i);
      if (whole || st === ChunkState.DATA) {
        if (runStart < 0) runStart = i;
        continue;
      }
      await flushRun(i);
      const from = Math.max(offset, cStart);
      const patch = data.subarray(from - offset, Math.min(end, cEnd) - offset);
      const full = await merged(i, st === ChunkState.ZERO ? 'zero' : 'image', from - cStart, patch);
      if (full) await overlay.writeData(cStart, full);
      else await overlay.writeData(from, patch);
      overlay.setState(i, ChunkState.DATA);
    }
    await flushRun(last + 1);
  }

  return {
    size: source.size,
    chunkSize: cs,
    readOnly: false,
    canMultiConn: true,

    async read(offset: number, length: number): Promise<Segment[]> {
      const end = offset + length;
      const out: Array<Segment | Promise<Segment[]>> = [];
      let pos = offset;
      while (pos < end) {
        const i = chunkOf(pos);
        const st = overlay.state(i);
        // The longest stretch of chunks in the same state.
        let j = i + 1;
        const lastChunk = chunkOf(end - 1);
        if (st === ChunkState.IMAGE) j = overlay.nextTouched(i + 1, lastChunk + 1);
        else while (j <= lastChunk && overlay.state(j) === st) j++;
        const stop = Math.min(end, j * cs);
        const from = pos;
        if (st === ChunkState.IMAGE) out.push(source.read(from, stop - from));
        else if (st === ChunkState.ZERO) out.push({ offset: from, hole: stop - from });
        else out.push(overlay.readData(from, stop - from).then((data) => [{ offset: from, data }]));
        pos = stop;
      }
      const flat: Segment[] = [];
      for (const part of await Promise.all(out)) {
        for (const s of Array.isArray(part) ? part : [part]) {
          const prev = flat.at(-1);
          if (prev && 'hole' in prev && 'hole' in s) prev.hole += s.hole;
          else flat.push(s);
        }
      }
      return flat;
    },

    async runs(offset: number, length: number, maxRuns: number): Promise<NbdRun[]> {
      const end = offset + length;
      const out: NbdRun[] = [];
      const add = (len: number, zero: boolean): boolean => {
        const last = out.at(-1);
        if (last && last.zero === zero) last.length += len;
        else if (out.length === maxRuns) return false;
        else out.push({ length: len, zero });
        return true;
      };
      let pos = offset;
      while (pos < end) {
        const i = chunkOf(pos);
        const st = overlay.state(i);
        if (st === ChunkState.IMAGE) {
          const stop = Math.min(end, overlay.nextTouched(i + 1, chunkOf(end - 1) + 1) * cs);
          let covered = 0;
          for (const r of await source.runs(pos, stop - pos, maxRuns)) {
            if (!add(r.length, r.zero)) return out;
            covered += r.length;
          }
          if (covered < stop - pos) return out; // the image's runs stopped short (maxRuns): so do we
          pos = stop;
        } else {
          const stop = Math.min(end, (i + 1) * cs);
          if (!add(stop - pos, st === ChunkState.ZERO)) return out;
          pos = stop;
        }
      }
      return out;
    },

    async write(offset: number, data: Buffer): Promise<void> {
      if (data.length === 0) return;
      await overlay.withChunks(chunkOf(offset), chunkOf(offset + data.length - 1), () => writeLocked(offset, data));
    },

    async zero(offset: number, length: number): Promise<void> {
      if (length === 0) return;
      const end = offset + length;
      // A TRIM may span 4 GiB: lock and zero at most ZERO_WINDOW chunks at a time.
      for (let w = chunkOf(offset); w <= chunkOf(end - 1); w += ZERO_WINDOW) {
        await zeroWindow(offset, end, w, Math.min(chunkOf(end - 1), w + ZERO_WINDOW - 1));
      }
    },

    flush: () => overlay.flush(),
  };

  /** Zeroes [offset, end) ∩ chunks first..last. */
  async function zeroWindow(offset: number, end: number, first: number, last: number): Promise<void> {
    await overlay.withChunks(first, last, async () => {
      for (let i = first; i <= last; i++) {
        const cStart = i * cs;
        const cEnd = cStart + overlay.extentLength(i);
        if (offset <= cStart && end >= cEnd) {
          overlay.setState(i, ChunkState.ZERO);
          continue;
        }
        const st = overlay.state(i);
        if (st === ChunkState.ZERO) continue;
        const from = Math.max(offset, cStart);
        const to = Math.min(end, cEnd);
        if (st === ChunkState.IMAGE && (await source.runs(cStart, cEnd - cStart, 2)).every((r) => r.zero)) continue; // already zeros
        await writeLocked(from, Buffer.alloc(to - from));
      }
    });
  }
}

/** Chunks locked and zeroed at a time by one TRIM / WRITE_ZEROES. */
const ZERO_WINDOW = 1024;
