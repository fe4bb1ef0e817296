// Livepeer Studio's JavaScript SDK (npm `livepeer`), unchanged, calling each method of its
// `generate` namespace on the service at argv[2] with the bearer token argv[3]; argv[4] is a
// folder holding in.png and tone.wav. Prints one JSON object: what the SDK parsed, per method.
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Livepeer } from "livepeer";

const [serverURL, apiKey, folder] = process.argv.slice(2);
const livepeer = new Livepeer({ serverURL, apiKey });
const png = await readFile(join(folder, "in.png"));
const wav = await readFile(join(folder, "tone.wav"));
const image = () => ({ fileName: "in.png", content: new Blob([png], { type: "image/png" }) });

const calls = {
  textToImage: () =>
    livepeer.generate.textToImage({ prompt: "a red cat", width: 64, height: 64, seed: 7, numInferenceSteps: 2 }),
  imageToImage: () =>
    livepeer.generate.imageToImage({ prompt: "make it blue", image: image(), seed: 3, numInferenceSteps: 2 }),
  imageToVideo: () =>
    livepeer.generate.imageToVideo({
      image: image(),
      modelId: "stabilityai/stable-video-diffusion-img2vid-xt",
      width: 64,
      height: 64,
      numInferenceSteps: 2,
    }),
  upscale: () => livepeer.generate.upscale({ prompt: "sharp", image: image(), numInferenceSteps: 2 }),
  audioToText: () =>
    livepeer.generate.audioToText({ audio: { fileName: "tone.wav", content: new Blob([wav]) } }),
  segmentAnything2: () =>
    livepeer.generate.segmentAnything2({
      image: image(),
      pointCoords: "[[30, 20]]",
      pointLabels: "[1]",
      multimaskOutput: false,
    }),
  llm: () => livepeer.generate.llm({ prompt: "Hi", systemMsg: "Be brief.", maxTokens: 3 }),
};

const results = {};
for (const [name, call] of Object.entries(calls)) {
  try {
    const answer = await call();
    const { contentType, statusCode, rawResponse, ...parsed } = answer;
    results[name] = { status: statusCode, parsed };
  } catch (error) {
    results[name] = { error: `${error.name}: ${error.message}` };
  }
}
console.log(JSON.stringify(results));
