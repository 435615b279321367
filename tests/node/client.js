// Creates a key and authorizes with it, through stubs loaded from protos/ at run time.
// Usage: node client.js TARGET TOKEN ACCOUNT_ID  -> prints one JSON line with the results.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, token, accountId] = process.argv.slice(2);
const definition = protoLoader.loadSync("keyguard/v1/keyguard.proto", {
  includeDirs: [path.join(__dirname, "..", "..", "protos")],
  keepCase: true,
  enums: String,
  longs: String,
  defaults: true,
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
  console.log(JSON.stringify({ created: created.key, allowed, denied, invalid }));
  keys.close();
  auth.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
