/**
 * Throughput probe for the reader pipeline (not a test): writes a 1 GiB image
 * of 'mixed' chunks (8 KiB pages, each random or text: incompressible-ish),
 * then reads it in full mode with 1 and 2 workers and prints MB/s of plain
 * data, plus single-thread SHA-256 and zstd-1 rates for context. The image is
 * in the page cache after writing, so this measures CPU, not the disk.
 *
 *   node --import tsx test/support/reader-throughput.ts [sizeMiB] [dir]
 */
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import binding from 'zstd-napi/binding.js';
import { readChunks } from '../../agent/reader/chunk-reader.js';
import { chunkContent, writeTestImage } from './random-image.js';

const MB = 1e6;

function rate(bytes: number, seconds: number): string {
  return `${(bytes / MB / seconds).toFixed(0)} MB/s`;
}

function primitives(chunkSize: number): void {
  const sample = chunkContent('mixed', 7, 0, chunkSize);
  const rounds = Math.ceil((256 << 20) / chunkSize);
  let t = performance.now();
  for (let i = 0; i < rounds; i++) createHash('sha256').update(sample).digest();
  const hashS = (performance.now() - t) / 1000;
  const cctx = new binding.CCtx();
  const dst = Buffer.allocUnsafe(binding.compressBound(chunkSize));
  let out = 0;
  t = performance.now();
  for (let i = 0; i < rounds; i++) out += cctx.compress(dst, sample, 1);
  const zS = (performance.now() - t) / 1000;
  const bytes = rounds * chunkSize;
  console.log(`one thread: sha256 ${rate(bytes, hashS)}, zstd-1 ${rate(bytes, zS)} (ratio ${(out / bytes).toFixed(2)})`);
}

async function main(): Promise<void> {
  const sizeMiB = Number(process.argv[2] ?? 1024);
  const dir = await mkdtemp(join(process.argv[3] ?? tmpdir(), 'blocksnap-throughput-'));
  const chunkSize = 64 << 10;
  const volumeSize = sizeMiB << 20;
  try {
    const path = join(dir, 'image');
    let t = performance.now();
    await writeTestImage(path, { chunkSize, volumeSize, seed: 42, kindOf: () => 'mixed' });
    console.log(`wrote ${sizeMiB} MiB of mixed chunks in ${((performance.now() - t) / 1000).toFixed(1)} s`);
    primitives(chunkSize);
    // Wall-clock MB/s depends on whoever else uses the 2 cores; MB per
    // CPU-second of this process (all threads) does not, and bounds what the
    // reader can do with N free cores.
    const rates: Record<number, number[]> = { 1: [], 2: [] };
    for (let round = 0; round < 3; round++) {
      for (const workers of [1, 2]) {
        const cpu0 = process.cpuUsage();
        const stream = readChunks({ path, volumeSize, chunkSize, startIndex: 0, mode: 'full' }, { workers });
        let compressed = 0;
        for await (const c of stream) compressed += c.data?.length ?? 0;
        const s = stream.stats();
        const cpu = process.cpuUsage(cpu0);
        rates[workers]!.push(s.bytesRead / MB / s.seconds);
        console.log(
          `workers=${workers}: ${rate(s.bytesRead, s.seconds)} wall, ` +
            `${rate(s.bytesRead, (cpu.user + cpu.system) / 1e6)} per CPU-second, ${s.chunksEmitted} chunks, ` +
            `compressed to ${(compressed / s.plainBytesEmitted).toFixed(2)}, ${s.seconds.toFixed(2)} s, load ${loadavg()[0]!.toFixed(1)}`,
        );
      }
    }
    for (const [w, r] of Object.entries(rates)) {
      const sorted = [...r].sort((a, b) => a - b);
      console.log(`workers=${w}: median ${sorted[1]!.toFixed(0)} MB/s, best ${sorted[2]!.toFixed(0)} MB/s`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
