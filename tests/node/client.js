// Creates a key and authorizes with it, through stubs loaded from protos/ at run time: with
// Authorize, and with several messages on one AuthorizeStream stream (answers keyed by id).
// Usage: node client.js TARGET TOKEN ACCOUNT_ID GOOGLEAPIS_DIR  -> prints one JSON line with the results.
// GOOGLEAPIS_DIR holds google/api/annotations.proto (the HTTP rules keyguard.proto imports), e.g.
// googleapis-common-protos' site-packages directory, or a clone of github.com/googleapis/googleapis.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, token, accountId, googleapis] = process.argv.slice(2);
const definition = protoLoader.loadSync("keyguard/v1/keyguard.proto", {
  includeDirs: [path.join(__dirname, "..", "..", "protos"), googleapis],
  keepCase: true,
  enums: String,
  longs: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).keyguard.v1;
const credentials = grpc.credentials.createInsecure();
const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${token}`);

function call(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, metadata, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

// Sends every message on one AuthorizeStream stream, half-closes, and resolves with the answers by id.
function stream(client, messages) {
  return new Promise((resolve, reject) => {
    const answers = {};
    const call = client.AuthorizeStream(metadata);
    call.on("data", (answer) => {
      answers[answer.id] = answer;
    });
    call.on("error", reject);
    call.on("end", () => resolve(answers));
    for (const message of messages) call.write(message);
    call.end();
  });
}

async function main() {
  const keys = new v1.KeyManagement(target, credentials);
  const auth = new v1.Authorization(target, credentials);
  const created = await call(keys, "CreateKey", {
    account_id: accountId,
    name: "node bot",
    permission: "PERMISSION_TRADE",
    allowed_ips: ["2001:db8::/32"],
  });
  const decide = (privateKey, permission, destination) =>
    call(auth, "Authorize", {
      access_key: created.key.access_key,
      private_key: privateKey,
      client_ip: "2001:db8::1",
      required_permission: permission,
      destination,
    });
  const allowed = await decide(created.private_key, "PERMISSION_TRADE");
  const denied = await decide(created.private_key, "PERMISSION_WITHDRAW", { asset: "BTC", address: "bc1q" });
  let invalid;
  try {
    await call(keys, "CreateKey", { account_id: accountId, name: "", permission: "PERMISSION_READ" });
  } catch (error) {
    invalid = { code: error.code, details: error.details };
  }
  const request = (permission, clientIp, destination) => ({
    access_key: created.key.access_key,
    private_key: created.private_key,
    client_ip: clientIp,
    required_permission: permission,
    destination,
  });
  // ids are uint64: strings here (longs: String), so any 64-bit id survives JavaScript.
  const streamed = await stream(auth, [
    { id: "18446744073709551615", request: request("PERMISSION_TRADE", "2001:db8::1") },
    { id: "2", request: request("PERMISSION_WITHDRAW", "2001:db8::1", { asset: "BTC", address: "bc1q" }) },
    { id: "3", request: request("PERMISSION_READ", "not an ip") },
    { id: "4", request: request("PERMISSION_READ", "2001:db8::2") },
  ]);
  for (const answer of Object.values(streamed)) {
    if (answer.error) {
      answer.error.details = answer.error.details.map((d) => d.type_url);
    }
  }
  console.log(JSON.stringify({ created: created.key, allowed, denied, invalid, streamed }));
  keys.close();
  auth.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
