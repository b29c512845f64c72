//go:build linux

package e2e

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// acmeName is the gateway's public name in the ACME test; each namespace
// resolves it to the gateway through its own hosts file.
const acmeName = "gw.nlvpn.test"

// A gateway with --acme-domain gets its certificate from an ACME CA
// (pebble, Let's Encrypt's test CA, in the gateway's namespace, checking
// HTTP-01 for real), tokens carry no pin, and agent and client verify the
// chain and the name. Then the certificate is replaced by one with a new
// key (what a renewal does): the enrolled nodes reconnect by themselves
// and the tunnel works again, with no new token.
func TestACMECertificate(t *testing.T) {
	e := &env{t: t, dir: t.TempDir()}
	e.lab = newLab(t, coneCone)
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
	})
	startLANServers(t, e.lab)
	for _, ns := range []string{e.lab.NS.GW, e.lab.NS.Client, e.lab.NS.Agent} {
		setNetnsHosts(t, ns, fmt.Sprintf("127.0.0.1 localhost\n%s %s\n", e.lab.Gateway, acmeName))
	}

	apiCert, directory := startPebble(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	public := fmt.Sprintf("%s:%d", acmeName, gwPort)
	e.gwState = filepath.Join(e.dir, "gw")
	e.gwArgs = []string{"gateway", "--listen", fmt.Sprintf(":%d", gwPort), "--public-addr", public, "--state-dir", e.gwState,
		"--acme-domain", acmeName, "--acme-directory", directory, "--acme-ca", apiCert, "--acme-http", ":80"}
	e.startGateway(t)
	if err := e.gateway.WaitLog(ctx, "ACME certificate ready"); err != nil {
		t.Fatalf("gateway: %v\n%s", err, e.gateway.Log())
	}
	first := cachedKey(t, e.gwState)

	// Tokens name the gateway by its name and carry no pin.
	issue := func(args ...string) string {
		out, stderr, err := lab.Run(ctx, e.lab.NS.GW, append([]string{nlvpnBin, "token", "--state-dir", e.gwState}, args...)...)
		if err != nil {
			t.Fatalf("nlvpn token %v: %v\n%s", args, err, stderr)
		}
		return strings.TrimSpace(string(out))
	}
	e.agentTok = issue("--agent", agentName)
	e.clientTok = issue("--client", "alice", "--allow-agent", agentName)
	e.agent = e.start(t, e.lab.NS.Agent, "agent", "agent", "--token-file", e.tokenFile(e.agentTok),
		"--advertise", e.lab.LANSubnet.String(), "--state-dir", e.agentStateDir())
	if err := e.agent.WaitLog(ctx, "registered"); err != nil {
		t.Fatalf("agent: %v", err)
	}
	e.client = e.start(t, e.lab.NS.Client, "client", "up", "--token-file", e.tokenFile(e.clientTok), "--agent", agentName,
		"--state-dir", filepath.Join(e.dir, "client"), "--tun", tunName, "--relay") // the tunnel needs the gateway
	e.waitFor(t, readyTimeout, "the tunnel through the ACME gateway", e.httpHealth)

	// The TCP/TLS leg shows the same certificate, checked the same way.
	const socks = "127.0.0.1:1090"
	overTCP := e.start(t, e.lab.NS.Client, "tcp-client", "up", "--netstack", "--transport", "tcp", "--token-file", e.tokenFile(e.clientTok),
		"--agent", agentName, "--state-dir", filepath.Join(e.dir, "tcp-client"), "--socks5", socks, "--http-proxy", "")
	e.waitFor(t, readyTimeout, "a tunnel over the TCP leg of the ACME gateway", func() error {
		if !overTCP.Running() {
			return errStop(fmt.Errorf("the TCP client exited: %v", overTCP.Err()))
		}
		_, err := e.curl(5*time.Second, "--socks5", socks, fmt.Sprintf("http://%s/health", e.lab.LANHost))
		return err
	})
	overTCP.Stop()

	// A certificate with a new key, as a renewal brings: drop the cached
	// one and restart the gateway, which gets another from the CA.
	e.gateway.Stop()
	if err := os.Remove(filepath.Join(e.gwState, "acme", acmeName)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.startGateway(t)
	if err := e.gateway.WaitLog(ctx, "ACME certificate ready"); err != nil {
		t.Fatalf("gateway after the renewal: %v\n%s", err, e.gateway.Log())
	}
	if second := cachedKey(t, e.gwState); bytes.Equal(first, second) {
		t.Fatal("the new certificate has the old key; the test renews nothing")
	}
	e.waitFor(t, readyTimeout, "the tunnel after the new certificate", e.httpHealth)
	// Both nodes registered again, checking the new certificate.
	for _, p := range []*lab.Process{e.agent, e.client} {
		if n := strings.Count(p.Log(), "registered with gateway"); n < 2 {
			t.Fatalf("%s registered %d times, want again after the restart:\n%s", p, n, p.Log())
		}
	}
	t.Logf("tunnel back %v after the gateway restarted with a certificate for a new key", time.Since(start).Round(time.Millisecond))
	for _, p := range []*lab.Process{e.agent, e.client} {
		if !p.Running() {
			t.Fatalf("%s exited after the certificate changed", p)
		}
	}
}

// startPebble runs pebble (Let's Encrypt's test CA, built from the go.mod
// tool directive) in the gateway host's namespace, its API on a
// certificate of ours for the host's address, checking HTTP-01 for real
// at port 80 of the names it is asked for (the namespace's hosts file
// must resolve them). Every nlvpn process started from then on trusts
// pebble's root as a system root (SSL_CERT_FILE). It returns the API's
// certificate (--acme-ca) and the directory URL of the shim in front of
// pebble (--acme-directory).
func startPebble(t *testing.T, e *env) (apiCert, directory string) {
	t.Helper()
	apiCert = filepath.Join(e.dir, "pebble-api.pem")
	apiKey := filepath.Join(e.dir, "pebble-api.key")
	writeSelfSigned(t, apiCert, apiKey, net.IP(e.lab.Gateway.AsSlice()))
	conf := filepath.Join(e.dir, "pebble.json")
	c, _ := json.Marshal(map[string]any{"pebble": map[string]any{
		"listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
		"certificate": apiCert, "privateKey": apiKey, "httpPort": 80, "tlsPort": 443,
		"ocspResponderURL": "", "externalAccountBindingRequired": false,
		"retryAfter": map[string]int{"authz": 1, "order": 1}, "keyAlgorithm": "ecdsa",
	}})
	if err := os.WriteFile(conf, c, 0o644); err != nil {
		t.Fatal(err)
	}
	pebbleBin := filepath.Join(e.dir, "pebble")
	build := exec.Command("go", "build", "-o", pebbleBin, "github.com/letsencrypt/pebble/v2/cmd/pebble")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building pebble (go.mod tool): %v\n%s", err, out)
	}
	pebble, err := e.lab.Start(e.lab.NS.GW, lab.ProcConfig{Name: "pebble", Args: []string{pebbleBin, "-config", conf},
		Env:     []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0"},
		LogPath: filepath.Join(e.dir, "pebble.log")})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, pebble)
	e.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := pebble.WaitLog(ctx, "Listening on"); err != nil {
		t.Fatalf("pebble: %v\n%s", err, pebble.Log())
	}
	// Its root, which nodes trust as a system root would be.
	root := filepath.Join(e.dir, "acme-root.pem")
	e.waitFor(t, 10*time.Second, "pebble's root", func() error {
		_, stderr, err := lab.Run(ctx, e.lab.NS.GW, "curl", "-sSf", "--cacert", apiCert, "-o", root, fmt.Sprintf("https://%s:15000/roots/0", e.lab.Gateway))
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		return nil
	})
	e.extraEnv = append(e.extraEnv, "SSL_CERT_FILE="+root)
	return apiCert, pebbleShim(t, e, apiCert, apiKey)
}

// pebbleShim puts a proxy in front of pebble that gives its finalize
// answers the Location header Let's Encrypt's CA sends and pebble does
// not: x/crypto/acme follows it to wait for the certificate. It returns
// the directory URL to use.
func pebbleShim(t *testing.T, e *env, apiCert, apiKey string) string {
	t.Helper()
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(apiCert)
	if err != nil || !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("pebble's API certificate: %v", err)
	}
	target := &url.URL{Scheme: "https", Host: fmt.Sprintf("%s:14000", e.lab.Gateway)}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = r.In.Host // pebble names its URLs after Host: the shim's
		},
		Transport: &http.Transport{DialContext: lab.Dialer(e.lab.NS.GW), TLSClientConfig: &tls.Config{RootCAs: pool}},
		ModifyResponse: func(res *http.Response) error {
			if id, ok := strings.CutPrefix(res.Request.URL.Path, "/finalize-order/"); ok && res.Header.Get("Location") == "" {
				res.Header.Set("Location", "https://"+res.Request.Host+"/my-order/"+id)
			}
			return nil
		},
	}
	cert, err := tls.LoadX509KeyPair(apiCert, apiKey)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := lab.Listen(e.lab.NS.GW, "tcp", fmt.Sprintf("%s:14001", e.lab.Gateway))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: rp, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ReadHeaderTimeout: 5 * time.Second}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return fmt.Sprintf("https://%s:14001/dir", e.lab.Gateway)
}

// cachedKey is the public key of the certificate autocert cached.
func cachedKey(t *testing.T, state string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "acme", acmeName))
	if err != nil {
		t.Fatal(err)
	}
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			t.Fatal("no certificate in the ACME cache")
		}
		if blk.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			return c.RawSubjectPublicKeyInfo
		}
	}
}

// writeSelfSigned writes a certificate for ip and its key.
func writeSelfSigned(t *testing.T, certPath, keyPath string, ip net.IP) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "pebble"}, IPAddresses: []net.IP{ip},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// setNetnsHosts gives processes started in ns (ip netns exec bind-mounts
// /etc/netns/NS/*) their own hosts file; removed, by exact name, at
// cleanup.
func setNetnsHosts(t *testing.T, ns, content string) {
	t.Helper()
	if ns == "" || strings.ContainsAny(ns, "/.") {
		t.Fatalf("bad namespace name %q", ns)
	}
	dir := filepath.Join("/etc/netns", ns)
	made := false
	if _, err := os.Stat(dir); err != nil {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		made = true
	}
	path := filepath.Join(dir, "hosts")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.Remove(path)
		if made {
			if err := os.Remove(dir); err != nil {
				t.Errorf("removing %s: %v", dir, err)
			}
		}
	})
}
